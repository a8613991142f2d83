"""Chunk-wise causal generation: a generator that yields a video chunk by chunk, for as long
as asked, with a bounded KV cache.

Each chunk of ``frames_per_chunk`` latent frames starts from fresh noise and is denoised with
``steps_per_chunk`` flow-matching (Euler) steps of the pipeline's scheduler, attending
bidirectionally within the chunk and to the cached keys and values of the earlier chunks
(block-causal; :mod:`cadence.accel.sequence`). After its last step the clean chunk is run once
more at timestep 0, in ``write`` mode, and its keys and values go into the cache (CausVid, Yin
et al. 2025; Self-Forcing, Huang et al. 2025): later chunks see the clean past, as at training.

The steps are the scheduler's own spread of ``steps_per_chunk`` timesteps, or the ``sigmas`` given:
a few-step student (``cadence.distill``, ``pipe.student``) of ``steps_per_chunk`` steps runs at its own
trained sigmas by default, as Self-Forcing's student runs at its trained 1000/750/500/250; the
causal student ``ref-stream`` is trained on exactly this loop (:mod:`cadence.distill.causal`).

Where this differs from Self-Forcing:
there is no classifier-free guidance (distilled stream students run without it, and CFG would
need a cache per branch); one timestep per chunk, not per frame. The model is any Wan
transformer; no trained stream model exists here yet, so nothing is claimed about quality, and a
bidirectional model run this way drifts.

Prompt switching (LongLive, Yang et al. 2025, "KV re-cache"): ``prompts={k: embeds}`` conditions
chunk k and every later one on new embeddings. The cached keys and values were computed under the
old prompt (the self-attention input of every block but the first has passed through the earlier
blocks' cross-attention to the text), so before chunk k the kept frames are re-encoded: their
clean latents, which the stream keeps beside the cache while a re-cache is still ahead (evicted
with their frames, so bounded by the same policy), are run again at timestep 0 in ``write`` mode
with the new prompt, and their K/V replace the old. Without re-cache (``recache=False``) the old
K/V stay and only the text changes. Where this differs from LongLive: LongLive re-encodes the
frames of its local attention window in one forward under a block-causal mask; here every kept
frame (sink included) is re-encoded, run by run in generation order (a run: the adjacent kept
frames of one chunk), each run attending to the runs re-encoded before it. That is the same
block-causal pattern, made with the cache's own write passes: no mask is built, and each frame
is re-encoded at the position it holds in the cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cadence.accel.sequence._base import KV_CACHE, KVCache, KVFormatConfig, KVPolicyConfig, apply_format, apply_policy
from cadence.accel.sequence.policies import SinkWindowConfig
from cadence.stream.decode import WanStreamDecoder

DEFAULT_POLICY = SinkWindowConfig(sink=3, frames=12)  # LongLive's frame sink and local window


@dataclass
class StreamChunk:
    """One finished chunk."""

    index: int
    first_frame: int  # absolute index of its first latent frame
    latents: torch.Tensor  # (B, C, frames, H, W), float32
    # (B, video frames, 3, H, W) in [-1, 1]: the latents themselves for pixel-space models, Wan's VAE decode
    # (1 video frame for the stream's first latent frame, 4 for every later one) for pipelines with one;
    # None when decoding was turned off
    frames: torch.Tensor | None
    kv_bytes: int  # bytes the KV cache holds after this chunk (the last of a bounded stream is not written)
    kept_frames: list[int]  # absolute indices of the latent frames the cache keeps
    # the frames re-encoded with this chunk's new prompt before it (a prompt switch's KV re-cache)
    recached_frames: list[int] = field(default_factory=list)


def stream(
    pipe_or_transformer,
    prompt_embeds: torch.Tensor,
    *,
    chunks: int | None = None,
    frames_per_chunk: int = 3,
    steps_per_chunk: int = 4,
    policy: KVPolicyConfig | None = None,
    kv_format: KVFormatConfig | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    decode: bool = True,
    prompts: Mapping[int, torch.Tensor] | None = None,
    recache: bool = True,
    sigmas: list[float] | None = None,
) -> Iterator[StreamChunk]:
    """Generate ``chunks`` chunks (None: until the generator is closed), yielding each as it
    finishes. Every argument is checked here, before anything is generated; the KV cache's hooks
    are installed on the first ``next()`` and removed when the generator ends or is closed.

    ``prompt_embeds``: (B, tokens, text_dim). ``height``, ``width``: of the model's input (pixels for
    the reference models, latents for a pipeline with a VAE), defaulting to the pipeline's sample
    size. ``policy`` and ``kv_format`` default to kv-sink-window(sink=3, frames=12) and the native
    format, unless the model already carries sequence terms (``accelerate``), which are then used
    as they are. ``decode``: give each chunk's video frames (a pipeline's VAE decodes them chunk by
    chunk, :mod:`cadence.stream.decode`). ``sigmas``: the noise levels of a chunk's steps (one per step,
    decreasing, in (0, 1]); default: a student pipeline's own when it has ``steps_per_chunk`` steps,
    else the scheduler's spread."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    pipe = pipe_or_transformer if transformer is not pipe_or_transformer else None
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks={chunks!r}; valid: an int >= 1, or None to stream until closed")
    for name, value in (("frames_per_chunk", frames_per_chunk), ("steps_per_chunk", steps_per_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; valid: an int >= 1")
    if prompt_embeds is None or prompt_embeds.dim() != 3:
        raise ValueError(f"prompt_embeds of shape {None if prompt_embeds is None else tuple(prompt_embeds.shape)}; "
                         "valid: (batch, tokens, text_dim)")
    schedule = _check_prompts(prompts, prompt_embeds, chunks)
    if not isinstance(recache, bool):
        raise TypeError(f"recache={recache!r}; valid: True or False")
    held = getattr(transformer, KV_CACHE, None)
    if held is not None:
        if policy is not None or kv_format is not None:
            raise ValueError(f"the model already carries the KV cache terms {held.policy} + {held.format}; pass "
                             "neither policy nor kv_format, or remove those terms first")
        if held.policy is None:
            terms = " + ".join(str(term) for term in (held.format_term, held.sparse_term) if term is not None)
            raise ValueError(f"the model carries {terms} but no KV cache policy; apply kv-full, kv-window, "
                             "kv-sink-window or kv-pack")
        policy = held.policy
    policy = policy if policy is not None else DEFAULT_POLICY
    if not isinstance(policy, KVPolicyConfig):
        raise TypeError(f"policy={policy!r}; valid: FullConfig, WindowConfig, SinkWindowConfig or PackConfig")
    if kv_format is not None and not isinstance(kv_format, KVFormatConfig):
        raise TypeError(f"kv_format={kv_format!r}; valid: KVFormatConfig(format=...)")
    policy.check_chunk(frames_per_chunk)
    if chunks is not None:  # a full cache too small for the stream is refused before it starts
        policy.keep(list(range((chunks - 1) * frames_per_chunk)))
    most_cached = policy.max_frames if chunks is None else min(policy.max_frames, (chunks - 1) * frames_per_chunk)
    positions = transformer.rope.max_seq_len
    if most_cached + frames_per_chunk > positions:
        raise ValueError(
            f"{policy} keeps up to {most_cached} frames and a chunk adds {frames_per_chunk}: positions up to "
            f"{most_cached + frames_per_chunk - 1}, past the model's rotary table of {positions} (rope_max_seq_len); "
            f"valid: at most {positions - frames_per_chunk} cached frames")
    size = dict(getattr(getattr(pipe, "config", None), "sample_size", None) or {})
    height, width = height or size.get("height"), width or size.get("width")
    _, patch_h, patch_w = transformer.config.patch_size
    if not height or not width or height % patch_h or width % patch_w:
        raise ValueError(f"height={height}, width={width}; valid: positive multiples of the patch size "
                         f"{patch_h}x{patch_w}")
    if scheduler is None:
        source = getattr(pipe, "scheduler", None)
        scheduler = type(source).from_config(source.config) if source is not None else FlowMatchEulerDiscreteScheduler()
    sigmas = _check_sigmas(sigmas, getattr(pipe, "student", None), steps_per_chunk)
    shift = scheduler.config.get("shift", 1.0)
    if sigmas is not None and (shift != 1.0 or scheduler.config.get("use_dynamic_shifting")):
        raise ValueError(f"sigmas={sigmas} with a scheduler of shift={shift}: set_timesteps would shift them again; "
                         "valid: a scheduler at shift 1.0 without dynamic shifting (a student's own)")
    vae = getattr(pipe, "vae", None)
    decoder = WanStreamDecoder(vae) if decode and vae is not None else None
    return _generate(transformer, prompt_embeds, chunks, frames_per_chunk, steps_per_chunk, policy, kv_format,
                     held is None, (height, width), seed, scheduler, decode, decoder, schedule, recache, sigmas)


def _check_sigmas(sigmas, student: dict | None, steps: int) -> list[float] | None:
    """The chunk's sigmas: those given, else a student's own of ``steps`` steps, else None (the
    scheduler's spread); refused unless one per step, decreasing, in (0, 1]."""
    if sigmas is None:
        return list(student["sigmas"]) if student and student.get("steps") == steps else None
    values = list(sigmas) if isinstance(sigmas, (list, tuple)) else None
    if (values is None or len(values) != steps or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values)
            or any(a <= b for a, b in itertools.pairwise(values))):
        raise ValueError(f"sigmas={sigmas!r}; valid: {steps} noise levels (one per step of a chunk), decreasing, "
                         "each in (0, 1]")
    return [float(v) for v in values]


def _check_prompts(prompts, prompt_embeds: torch.Tensor, chunks: int | None) -> dict[int, torch.Tensor]:
    """The prompt switches as {chunk: embeds}, refused unless each names a later chunk of the stream
    and embeddings the chunk can take in place of ``prompt_embeds``."""
    if prompts is None:
        return {}
    if not isinstance(prompts, Mapping):
        raise TypeError(f"prompts={type(prompts).__name__}; valid: a mapping {{chunk index: prompt_embeds}}")
    last = "" if chunks is None else f"..{chunks - 1}"
    batch, _, width = prompt_embeds.shape
    for index, embeds in prompts.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 1 or (chunks is not None and index >= chunks):
            raise ValueError(f"a prompt switch at chunk {index!r}; valid: chunk indices 1{last or ' or later'} (chunk 0 "
                             "takes prompt_embeds)")
        if not torch.is_tensor(embeds) or embeds.dim() != 3 or embeds.shape[0] != batch or embeds.shape[2] != width:
            shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
            raise ValueError(f"the prompt switched to at chunk {index} has embeddings of shape {shape}; valid: "
                             f"(batch={batch}, tokens, text_dim={width}), as prompt_embeds")
    return dict(sorted(prompts.items()))


def _generate(transformer, prompt_embeds, chunks, frames_per_chunk, steps_per_chunk, policy, kv_format, install,
              size, seed, scheduler, decode, decoder, schedule, recache, sigmas):
    handles = [apply_policy(transformer, policy)] if install else []
    if install and kv_format is not None:
        handles.append(apply_format(transformer, kv_format))
    cache: KVCache = getattr(transformer, KV_CACHE)
    cache.reset()
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds = prompt_embeds
    # absolute latent frame -> its clean latents (B, C, 1, H, W), for the kept frames only, and only
    # while a re-cache is still ahead: the memory the re-cache costs is bounded by the policy, as the KV is
    clean: dict[int, torch.Tensor] = {}
    try:
        for index in itertools.count() if chunks is None else range(chunks):
            last = chunks is not None and index == chunks - 1
            recached = []
            if index in schedule:
                embeds = schedule[index]
                if recache and cache.frames:
                    recached = _recache(transformer, cache, clean, embeds, frames_per_chunk, scheduler)
            latents = _chunk(transformer, cache, embeds, generator, frames_per_chunk, steps_per_chunk, size,
                             scheduler, write=not last, sigmas=sigmas)
            ahead = recache and any(switch > index for switch in schedule)
            if ahead and not last:
                first = index * frames_per_chunk
                clean.update({first + offset: latents[:, :, offset:offset + 1].clone()
                              for offset in range(frames_per_chunk)})
            clean = {frame: clean[frame] for frame in cache.frames if frame in clean} if ahead else {}
            frames = None
            if decode:
                video = decoder.decode(latents) if decoder is not None else latents.clamp(-1, 1)  # (B, C, T, H, W)
                frames = video.permute(0, 2, 1, 3, 4)
            yield StreamChunk(index, index * frames_per_chunk, latents, frames, cache.bytes(), list(cache.frames),
                              recached)
    finally:
        cache.set_mode("read")
        cache.reset()  # the KV memory goes with the stream
        if decoder is not None:
            decoder.close()
        for handle in reversed(handles):
            handle.remove()


@torch.no_grad()
def _chunk(transformer, cache: KVCache, prompt_embeds, generator, frames, steps, size, scheduler, write: bool,
           sigmas: list[float] | None = None):
    """Denoise one chunk against the cache; with ``write``, put its clean K/V into the cache."""
    parameter = next(transformer.parameters())
    device, dtype = parameter.device, transformer.dtype
    embeds = prompt_embeds.to(device=device, dtype=dtype)
    batch, channels = embeds.shape[0], transformer.config.in_channels
    latents = torch.randn(batch, channels, frames, *size, generator=generator).to(device)  # (B, C, F, H, W)
    if sigmas is None:
        scheduler.set_timesteps(steps, device=device)
    else:  # set_timesteps shifts what it is given: a student's sigmas are stored shifted, its scheduler at shift 1
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    scheduler.set_begin_index(0)
    cache.set_mode("read")
    for t in scheduler.timesteps:
        velocity = transformer(hidden_states=latents.to(dtype), timestep=t.expand(batch),
                               encoder_hidden_states=embeds, return_dict=False)[0]
        latents = scheduler.step(velocity.float(), t, latents, return_dict=False)[0]
    if write:
        _write(transformer, cache, latents, embeds, scheduler.timesteps.dtype)
    return latents


def _write(transformer, cache: KVCache, latents, embeds, timestep_dtype) -> None:
    """Run clean latents once at timestep 0 in ``write`` mode and commit their K/V to the cache."""
    cache.set_mode("write")
    clean = torch.zeros(latents.shape[0], device=latents.device, dtype=timestep_dtype)  # timestep 0
    transformer(hidden_states=latents.to(transformer.dtype), timestep=clean, encoder_hidden_states=embeds,
                return_dict=False)
    cache.commit()


@torch.no_grad()
def _recache(transformer, cache: KVCache, clean: dict[int, torch.Tensor], prompt_embeds, frames_per_chunk: int,
             scheduler) -> list[int]:
    """LongLive's KV re-cache: the kept frames' K/V computed again with ``prompt_embeds``, run by
    run, each attending to those re-encoded before it; the cache keeps the same frames, under the
    same indices. Returns the frames re-encoded."""
    kept, written = list(cache.frames), cache.written
    missing = [frame for frame in kept if frame not in clean]
    if missing:
        raise RuntimeError(f"re-cache needs the clean latents of kept frames {missing}, which were not kept")
    parameter = next(transformer.parameters())
    embeds = prompt_embeds.to(device=parameter.device, dtype=transformer.dtype)
    cache.reset()
    for run in _runs(kept, frames_per_chunk):
        cache.written = run[0]  # commit() indexes the frames it appends from here
        _write(transformer, cache, torch.cat([clean[frame] for frame in run], dim=2), embeds,
               scheduler.timesteps.dtype)
    cache.written = written
    if cache.frames != kept:  # every policy keeps a cache no larger than it kept already
        raise RuntimeError(f"re-cache kept frames {cache.frames}, not {kept}")
    return kept


def _runs(frames: list[int], frames_per_chunk: int) -> list[list[int]]:
    """Kept frames (oldest first) in runs: adjacent frames of one chunk, as they were written together."""
    runs: list[list[int]] = []
    for frame in frames:
        if runs and frame == runs[-1][-1] + 1 and frame // frames_per_chunk == runs[-1][-1] // frames_per_chunk:
            runs[-1].append(frame)
        else:
            runs.append([frame])
    return runs
