"""The attention intercept that token-level and sequence-level techniques share.

A stand-in processor runs a module's own attention processor under ``SDPAIntercept``, which
answers its ``scaled_dot_product_attention`` call with the technique's custom op
(``attend``); every other call runs as it is. A processor, unlike a hook that replaces the
module's ``forward``, is not guarded by identity in a compiled block, so every block shares
one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class SDPAIntercept(TorchFunctionMode):
    """Answers one attention module's ``scaled_dot_product_attention`` call with ``attend``
    (subclasses give it); ``handle`` and ``layer`` say whose call it is."""

    def __init__(self, handle: int, layer: torch.Tensor):
        super().__init__()
        self.handle, self.layer = handle, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.attend(*args, **kwargs)
        if getattr(func, "__module__", None) == "torch._tensor" and getattr(torch.Tensor, func.__name__, None) is func:
            # Tensor methods written in Python (unflatten, split, ...) call super(), which dynamo
            # cannot trace from inside a mode; called as methods they trace as graph ops.
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        raise NotImplementedError
