"""The stream's block-causal model as one full-sequence forward: what ``cadence.stream`` computes
chunk by chunk with its KV cache, computed here with a mask, so training needs no autograd
through the cache's custom op.

The stream (:mod:`cadence.stream.engine`) denoises chunk i (``chunk_frames`` latent frames) at a
timestep t while attending to the keys and values of chunks 0..i-1, each written by a pass of its
clean latents at timestep 0 that attended to the chunks before it. Every other part of a Wan
block (cross-attention, feed-forward, norms, adaLN) acts token by token, so the same numbers come
out of one forward over the sequence

    [clean chunk 0, ..., clean chunk i-1, noisy chunk i]      (frames at positions 0 .. (i+1)F - 1)

under the *block-causal* mask: a frame attends to the clean frames of earlier chunks and to the
frames of its own segment (its chunk, clean or noisy), and the clean frames run at timestep 0,
the noisy ones at t. The context is recomputed on every call instead of read from a cache:
ref-video is 1,024 tokens, and the mask is a dense boolean (frames x frames, expanded to tokens).

Several noisy chunks may go in one call (teacher forcing: ``clean`` holds chunks 0..n-2, ``noisy``
chunks 0..n-1, each noisy chunk at its own timestep): each sees exactly what it would see in the
stream with that clean past, because noisy frames are never visible to another segment. Training
uses that form (one forward with gradient for the whole clip); ``rollout`` the first (the stream's
loop, chunk by chunk).

How it is installed: diffusers 0.42's ``WanTransformer3DModel`` takes a timestep per token
(``timestep`` of shape (B, tokens), Wan 2.2 TI2V's path: adaLN and the output norm per token), so
the mixed clean / noisy sequence needs no change to the model. The mask and the positions go in
through a stand-in for each block's self-attention processor (``attn1``): it calls diffusers'
processor with the mask and with rotary tables built at the frames' own positions
(:func:`cadence.accel.sequence.rope.rotary_tables`, the tables the KV cache rotates with), so a
noisy chunk sits at the positions of the chunk it continues. Outside a ``velocity`` call the
stand-in passes every argument through unchanged; ``remove()`` puts diffusers' processors back,
and the model is then exactly as before (no weight, buffer or hook is touched).

Where this differs from CausVid / Self-Forcing's training: they run the causal model with
FlexAttention block masks (CausVid, teacher forcing over [noisy, clean]) or the KV cache itself
(Self-Forcing, through its rollout); here a dense boolean mask and recomputed context, which at
ref-video's size cost less than a cache (and are exact where the cache's op has no backward). One
timestep per chunk, not per frame, as the stream runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cadence.accel.sequence.rope import rotary_tables


class BlockCausal:
    """Block-causal forwards of one Wan transformer (``apply_block_causal``); ``remove()`` gives the
    model back exactly."""

    def __init__(self, transformer: torch.nn.Module, chunk_frames: int):
        rope, blocks = getattr(transformer, "rope", None), getattr(transformer, "blocks", None)
        if rope is None or not hasattr(rope, "t_dim") or blocks is None:
            raise ValueError(
                f"block-causal training needs a Wan transformer (WanTransformer3DModel); got "
                f"{type(transformer).__name__}"
            )
        if rope.patch_size[0] != 1:
            raise ValueError(
                f"patch_size={tuple(rope.patch_size)}: chunks are whole latent frames, which needs a "
                "temporal patch of 1; valid: (1, ph, pw)"
            )
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames!r}; valid: an int >= 1")
        modules = [block.attn1 for block in blocks]
        for module in modules:
            processor = module.processor
            if not type(processor).__module__.startswith("diffusers."):
                raise ValueError(
                    f"the model's self-attention processor is {type(processor).__name__}, not "
                    "diffusers' own: remove the cadence technique that placed it before training"
                )
            backend = getattr(processor, "_attention_backend", None)
            if backend is not None and str(getattr(backend, "value", backend)) != "native":
                raise ValueError(
                    f"attention backend {backend!r} cannot take a mask here; valid: diffusers' "
                    "'native' backend (torch's scaled_dot_product_attention)"
                )
        self.transformer, self.rope, self.chunk_frames = transformer, rope, chunk_frames
        self.modules = modules
        self.layout: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None  # (mask, rotary) of a call
        self.layouts: dict[tuple, tuple] = {}  # built layouts, by (clean, noisy frames, first chunk, patches, device)
        self.stand_ins = [_Masked(module.processor, self) for module in modules]
        for module, stand_in in zip(modules, self.stand_ins):
            module.processor = stand_in

    def remove(self) -> None:
        for module, stand_in in zip(self.modules, self.stand_ins):
            module.processor = stand_in.below
        self.layout = None

    # -- one forward --------------------------------------------------------------------------
    def velocity(
        self,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        clean: torch.Tensor | None = None,
        first_chunk: int = 0,
    ) -> torch.Tensor:
        """The velocity of ``noisy`` (B, C, chunks x F, H, W): chunks first_chunk.., chunk c at
        noise level ``sigma[:, c]`` ((B, chunks), in [0, 1]), each attending to the clean frames
        ``clean`` (B, C, frames, H, W; chunks 0.. at timestep 0, None: none) of earlier chunks.
        -> (B, C, chunks x F, H, W) float32."""
        frames = self.chunk_frames
        batch, _, noisy_frames, height, width = noisy.shape
        clean_frames = 0 if clean is None else clean.shape[2]
        if noisy_frames % frames or clean_frames % frames:
            raise ValueError(
                f"noisy frames {noisy_frames} and clean frames {clean_frames}; valid: whole chunks of {frames} frames"
            )
        chunks = noisy_frames // frames
        if sigma.shape != (batch, chunks):
            raise ValueError(f"sigma of shape {tuple(sigma.shape)}; valid: (batch={batch}, chunks={chunks})")
        # Both must fit the rotary table: the highest frame position, and the frames of the one input
        # (clean and noisy together), for which Wan's own rotary module builds its tables.
        highest, length = max(clean_frames, first_chunk * frames + noisy_frames), clean_frames + noisy_frames
        if max(highest, length) > self.rope.max_seq_len:
            raise ValueError(
                f"an input of {length} frames (clean {clean_frames} + noisy {noisy_frames}) reaching frame position "
                f"{highest - 1}: past the model's rotary table of {self.rope.max_seq_len} positions (rope_max_seq_len)"
            )
        _, patch_h, patch_w = self.rope.patch_size
        patches = (height // patch_h, width // patch_w)
        per_frame = patches[0] * patches[1]
        dtype, device = self.transformer.dtype, noisy.device
        key = (clean_frames, noisy_frames, first_chunk, patches, device)
        if key not in self.layouts:  # a rollout repeats each layout once per step
            self.layouts[key] = self._layout(clean_frames, noisy_frames, first_chunk, patches, device)
        # Timesteps per token: 0 for the clean context, sigma * 1000 for each noisy chunk (the pipelines' scale).
        timestep = torch.cat(
            [
                torch.zeros(batch, clean_frames, device=device, dtype=sigma.dtype),
                (sigma * 1000).repeat_interleave(frames, dim=1),
            ],
            dim=1,
        )
        timestep = timestep.repeat_interleave(per_frame, dim=1)  # (B, tokens)
        hidden = noisy if clean is None else torch.cat([clean.to(noisy.dtype), noisy], dim=2)
        self.layout = self.layouts[key]
        try:
            out = self.transformer(
                hidden_states=hidden.to(dtype),
                timestep=timestep,
                encoder_hidden_states=prompt_embeds.to(dtype),
                return_dict=False,
            )[0]
        finally:
            self.layout = None
        return out[:, :, clean_frames:].float()

    def _layout(self, clean_frames: int, noisy_frames: int, first_chunk: int, patches: tuple[int, int], device):
        """(mask (tokens, tokens) bool, rotary tables) of the sequence [clean, noisy]."""
        frames, per_frame = self.chunk_frames, patches[0] * patches[1]
        # Frame labels of [clean, noisy]: the chunk, whether clean, the rotary position.
        chunk_of = torch.cat([torch.arange(clean_frames) // frames, first_chunk + torch.arange(noisy_frames) // frames])
        is_clean = torch.cat([torch.ones(clean_frames, dtype=torch.bool), torch.zeros(noisy_frames, dtype=torch.bool)])
        positions = torch.cat([torch.arange(clean_frames), first_chunk * frames + torch.arange(noisy_frames)])
        mask = block_causal_mask(chunk_of, is_clean).repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
        cos, sin = rotary_tables(self.rope, positions, *patches)  # (1, 1, tokens, dim)
        # diffusers' processor takes the tables in its (B, tokens, heads, dim) layout
        return mask.to(device), (cos.transpose(1, 2).to(device), sin.transpose(1, 2).to(device))

    def x0(self, noisy, sigma, prompt_embeds, clean=None, first_chunk: int = 0) -> torch.Tensor:
        """x0 = x - sigma * v per chunk (rectified flow, :mod:`cadence.distill.student`)."""
        velocity = self.velocity(noisy, sigma, prompt_embeds, clean, first_chunk)
        return noisy - per_chunk(sigma, self.chunk_frames) * velocity

    # -- the stream's loop ----------------------------------------------------------------------
    def rollout(
        self, noise: torch.Tensor, sigmas: list[float], prompt_embeds: torch.Tensor, exit_step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's generation of the clip ``noise`` (B, C, frames, H, W), chunk by chunk: each
        chunk's Euler chain over ``sigmas`` (then 0), attending to the clean chunks before it.
        ``exit_step`` k (Self-Forcing's exit): a chunk stops at step k and its x0 prediction there is
        its output (None: every step, the stream's own). -> (the clip (B, C, frames, H, W), each
        chunk's input at its exit step, (B, C, frames, H, W)). Runs with whatever grad mode is on."""
        steps = len(sigmas)
        exit_step = steps - 1 if exit_step is None else exit_step
        if not 0 <= exit_step < steps:
            raise ValueError(f"exit_step={exit_step}; valid: 0 to {steps - 1}")
        frames, batch = self.chunk_frames, noise.shape[0]
        if noise.shape[2] % frames:
            raise ValueError(f"{noise.shape[2]} frames; valid: whole chunks of {frames} frames")
        # float32 sigmas, subtracted as tensors: the scheduler's own Euler step (x + (sigma_next - sigma) v)
        grid = torch.tensor([*sigmas, 0.0], dtype=torch.float32, device=noise.device)
        outputs, inputs = [], []
        for chunk in range(noise.shape[2] // frames):
            context = torch.cat(outputs, dim=2) if outputs else None
            x = noise[:, :, chunk * frames : (chunk + 1) * frames].float()
            for step in range(exit_step + 1):
                sigma = grid[step].expand(batch, 1)
                velocity = self.velocity(x, sigma, prompt_embeds, context, chunk)
                if step == exit_step:  # at the last step, x - sigma v is the scheduler's step to 0 bit for bit
                    inputs.append(x)
                    x = x - grid[step] * velocity
                else:
                    x = x + (grid[step + 1] - grid[step]) * velocity
            outputs.append(x)
        return torch.cat(outputs, dim=2), torch.cat(inputs, dim=2)


class _Masked:
    """Stands in for a Wan block's self-attention processor: during a ``BlockCausal.velocity`` call,
    diffusers' processor with the block-causal mask and the frames' rotary tables; otherwise
    diffusers' processor with the call's own arguments."""

    def __init__(self, below, owner: BlockCausal):
        self.below, self.owner = below, owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.owner.layout is None:
            return self.below(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        mask, rotary = self.owner.layout
        return self.below(attn, hidden_states, encoder_hidden_states, mask, rotary)

    def __getattr__(self, name):  # the processor's own settings (_attention_backend, ...)
        if name == "below":
            raise AttributeError(name)
        return getattr(self.below, name)


def block_causal_mask(chunk_of: torch.Tensor, is_clean: torch.Tensor) -> torch.Tensor:
    """(frames, frames) bool, True where query frame q may attend to key frame k: k is a clean frame
    of an earlier chunk, or k is in q's own segment (same chunk, both clean or both noisy)."""
    earlier_clean = is_clean[None, :] & (chunk_of[None, :] < chunk_of[:, None])
    same_segment = (chunk_of[None, :] == chunk_of[:, None]) & (is_clean[None, :] == is_clean[:, None])
    return earlier_clean | same_segment


def per_chunk(sigma: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, chunks) -> (B, 1, chunks x frames, 1, 1): a value per chunk broadcast over its frames."""
    return sigma.repeat_interleave(frames, dim=1)[:, None, :, None, None]


def apply_block_causal(transformer: torch.nn.Module, chunk_frames: int) -> BlockCausal:
    """Install the block-causal stand-ins; the returned object's ``remove()`` restores the model."""
    return BlockCausal(transformer, chunk_frames)


@contextlib.contextmanager
def block_causal(transformer: torch.nn.Module, chunk_frames: int) -> Iterator[BlockCausal]:
    """``apply_block_causal`` for the length of a ``with`` block (a backward after it still runs:
    the graph is recorded)."""
    causal = apply_block_causal(transformer, chunk_frames)
    try:
        yield causal
    finally:
        causal.remove()
