"""A block mask and the forms each attention kernel reads: the masked-dense reference a
token mask, FlexAttention a ``BlockMask``, the Triton kernel per-query-block lists of kept
key blocks. A pattern that does not change from step to step builds one ``BlockSparse``
and every layer and step reuses it (each form is made on first use and kept)."""

from __future__ import annotations

import torch


def kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, q blocks, k blocks) bool -> (kv_num_blocks (B, H, q), kv_indices (B, H, q, k))
    int32: the kept key blocks first, ascending (a stable sort puts them first)."""
    count = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return count, indices


class BlockSparse:
    """A block mask (B or 1, H or 1, blocks, blocks) of ``block``-token tiles over a
    sequence of ``tokens``, and the forms each kernel reads, made on first use."""

    def __init__(self, mask: torch.Tensor, block: int, tokens: int):
        self.mask, self.block, self.tokens = mask, block, tokens
        self._flex_masks: dict = {}  # (batch, heads) -> BlockMask
        self._kv_blocks: dict = {}  # (batch, heads) -> (kv_num_blocks, kv_indices)

    def expanded(self, batch: int, heads: int) -> torch.Tensor:
        return self.mask.expand(batch, heads, *self.mask.shape[-2:]).contiguous()

    def kv_blocks(self, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FlexAttention's (kv_num_blocks, kv_indices): per query block, how many key blocks
        it keeps and which, kept ones first in ascending order."""
        if (batch, heads) not in self._kv_blocks:
            self._kv_blocks[batch, heads] = kv_blocks(self.expanded(batch, heads))
        return self._kv_blocks[batch, heads]

    def flex_mask(self, batch: int, heads: int, key_valid: torch.Tensor | None):
        """A FlexAttention BlockMask. The mask_mod repeats the block mask token by token:
        eager FlexAttention (on the CPU) reads only the mask_mod, the compiled kernel only
        the block lists, and both must agree."""
        from torch.nn.attention.flex_attention import BlockMask

        if key_valid is None and (batch, heads) in self._flex_masks:
            return self._flex_masks[batch, heads]
        dense = self.expanded(batch, heads)
        block = self.block

        def mask_mod(b, h, q, kv):
            keep = dense[b, h, q // block, kv // block]
            return keep & key_valid[b, kv] if key_valid is not None else keep

        count, indices = self.kv_blocks(batch, heads)
        if key_valid is None:  # whole blocks: the kernel skips mask_mod inside them
            flex = BlockMask.from_kv_blocks(
                torch.zeros_like(count), indices, count, indices, BLOCK_SIZE=block,
                mask_mod=mask_mod, seq_lengths=(self.tokens, self.tokens),
            )
            self._flex_masks[batch, heads] = flex
            return flex
        return BlockMask.from_kv_blocks(
            count, indices, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(self.tokens, self.tokens)
        )

    def token_mask(self, key_valid: torch.Tensor | None) -> torch.Tensor:
        """(B or 1, H or 1, tokens, tokens) bool, for the masked-dense reference."""
        mask = self.mask.repeat_interleave(self.block, -1).repeat_interleave(self.block, -2)
        mask = mask[..., : self.tokens, : self.tokens]
        return mask & key_valid[:, None, None, :] if key_valid is not None else mask
