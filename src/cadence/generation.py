"""Calling a pipeline: one generation, in the argument names the pipeline itself takes,
checked before any work, giving back pixels in [-1, 1].

cadence's reference pipelines take ``steps``, ``seed``, ``frames``, ``height``, ``width`` and
return pixels in [-1, 1]; diffusers' own (``WanPipeline``, ``FluxPipeline``, ...) take
``num_inference_steps``, ``generator``, ``num_frames`` (video families), ``height``,
``width`` and ``output_type``, and return [0, 1] with ``output_type="pt"``. The names are read
from the pipeline's ``__call__`` signature, not from a table of classes, and so are the sizes
it uses when none is named (the checkpoint's own defaults).

Every request is checked before anything is allocated: counts against the limits below,
sizes against the multiple the VAE's scale factor and the transformer's patch size make,
against how far the transformer's rotary embedding reaches, and against the machine's memory.
A generation whose latents turn NaN or Inf is stopped at that step (``FloatingPointError``).
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch

# Every scheduler cadence drives (flow matching, DDIM, ...) is trained on 1000 timesteps:
# more steps than that only repeat timesteps, and a schedule of 10^8 steps alone filled 24 GB.
MAX_STEPS = 1000
MAX_SEEDS = 1000  # seeds per prompt in one bench run
MAX_PROMPTS = 1000  # prompts in one bench or calibration run
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Size:
    """The size of one output: ``frames`` is None for an image pipeline."""

    height: int
    width: int
    frames: int | None = None

    def __str__(self) -> str:
        spatial = f"{self.height} x {self.width}"
        return spatial if self.frames is None else f"{self.frames} frames x {spatial}"

    @property
    def output_bytes(self) -> int:
        """The decoded output as float32: (frames, 3, height, width)."""
        return (self.frames or 1) * 3 * self.height * self.width * 4


# -- checks that need no pipeline -------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value, limit: int, why: str = "") -> None:
    """A positive integer up to ``limit`` (steps, seeds, prompts); ``why`` explains the limit.
    ``name`` is an argument (``steps``) or a CLI option (``--seeds``), and is shown as written."""
    shown = f"{name} {value!r}" if name.startswith("--") else f"{name}={value!r}"
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{shown} must be a positive integer")
    if value > limit:
        raise ValueError(f"{shown} is over the limit of {limit}{why}")


def check_steps(steps, limit: int = MAX_STEPS) -> None:
    check_count("steps", steps, limit, why=f": the scheduler has {limit} training timesteps, and more steps only "
                                           "repeat them")


def check_guidance_scale(guidance_scale) -> None:
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 0 (1.0 or less turns CFG off)")


def check_seed(seed) -> None:
    low, high = SEED_RANGE
    if not _is_int(seed) or not low <= seed <= high:
        raise ValueError(f"seed={seed!r} must be an integer in [{low}, {high}] (what torch's generator takes)")


def memory_bytes() -> int | None:
    """This machine's physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"


def check_size_values(height=None, width=None, frames=None, what: str = "") -> None:
    """Positive integers whose decoded output fits in this machine's memory. ``what`` says
    where a value came from (the checkpoint's default) when the user did not name it."""
    for name, value in (("height", height), ("width", width), ("frames", frames)):
        if value is not None and (not _is_int(value) or value <= 0):
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if height is None or width is None:
        return
    size, memory = Size(height, width, frames), memory_bytes()
    if memory is not None and size.output_bytes > memory:
        given = ", ".join(f"{n}={v}" for n, v in (("frames", frames), ("height", height), ("width", width)) if v)
        raise ValueError(f"{given}{what}: the decoded output alone would take {_gib(size.output_bytes)} as float32, "
                         f"over this machine's {_gib(memory)} of memory")


# -- what a pipeline takes ------------------------------------------------------------------

def parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def _frames_parameter(pipe) -> str | None:
    names = parameters(pipe)
    return next((name for name in ("frames", "num_frames") if name in names), None)


def is_video(pipe) -> bool:
    """A pipeline that takes a frame count makes videos."""
    return _frames_parameter(pipe) is not None


def _config(module, key: str, default=None):
    config = getattr(module, "config", None)
    return getattr(config, key, default) if config is not None else default


# What diffusers' pipelines call their VAE's compression: Wan, CogVideoX and HunyuanVideo the
# first, FLUX and SD3 the second, LTX the third.
_SPATIAL = ("vae_scale_factor_spatial", "vae_scale_factor", "vae_spatial_compression_ratio")
_TEMPORAL = ("vae_scale_factor_temporal", "vae_temporal_compression_ratio")


def _vae_scales(pipe) -> tuple[int, int]:
    """(spatial, temporal) compression of the pipeline's VAE; (1, 1) in pixel space."""
    if getattr(pipe, "vae", None) is None:
        return 1, 1
    spatial = next((getattr(pipe, name) for name in _SPATIAL if getattr(pipe, name, None)), 1)
    temporal = next((getattr(pipe, name) for name in _TEMPORAL if getattr(pipe, name, None)), 1)
    return int(spatial), int(temporal)


def _patch(transformer) -> tuple[int, int]:
    """(spatial, temporal) patch size of the transformer's patchify."""
    patch = _config(transformer, "patch_size", 1) or 1
    if isinstance(patch, (tuple, list)):  # Wan: (t, h, w)
        return int(patch[-1]), int(patch[0]) if len(patch) == 3 else 1
    return int(patch), int(_config(transformer, "patch_size_t", 1) or 1)


def _packing(pipe, transformer) -> int:
    """How many latent pixels per side the pipeline packs into one token before the
    transformer sees them: FLUX packs 2 x 2 latents, which shows as a transformer taking
    four times the VAE's latent channels. 1 where the transformer patchifies itself."""
    vae = getattr(pipe, "vae", None)
    latent = 3 if vae is None else (_config(vae, "latent_channels") or _config(vae, "z_dim"))  # pixel space: RGB
    taken = _config(transformer, "in_channels")
    if not latent or not taken or taken % latent:
        return 1
    side = math.isqrt(taken // latent)
    return side if side * side == taken // latent else 1


@dataclass(frozen=True)
class Geometry:
    """What decides which sizes a pipeline can make."""

    spatial: int  # height and width must be multiples of it
    spatial_why: str
    temporal: int  # frames must be 1 + a multiple of it (1: any count)
    rope_positions: int | None  # the most patches per axis the rotary embedding reaches


def geometry(pipe) -> Geometry:
    transformer = getattr(pipe, "transformer", None)
    vae_spatial, vae_temporal = _vae_scales(pipe)
    patch, _ = _patch(transformer)
    packing = _packing(pipe, transformer)
    parts = [f"the VAE's scale factor {vae_spatial}"] if vae_spatial > 1 else []
    parts += [f"the patch size {patch}"] if patch > 1 else []
    parts += [f"the pipeline's {packing} x {packing} packing"] if packing > 1 else []
    rope = _config(transformer, "rope_max_seq_len")
    return Geometry(vae_spatial * patch * packing, " x ".join(parts) or "any size", vae_temporal,
                    int(rope) if rope else None)


def default_size(pipe) -> Size:
    """The size the pipeline makes when none is named: the defaults of its ``__call__``, or
    where those are None, what diffusers computes instead (FLUX and SD3: the transformer's
    sample size times the VAE's scale; CogVideoX: its sample height, width and frames)."""
    names = parameters(pipe)
    transformer = getattr(pipe, "transformer", None)
    vae_spatial, _ = _vae_scales(pipe)

    own = getattr(pipe, "config", {}).get("sample_size")  # cadence's reference pipelines name theirs

    def default(name: str, sample_keys: tuple[str, ...]):
        if isinstance(own, dict) and name in own:
            return own[name]
        value = names[name].default if name in names else None
        if value is not None and value is not inspect.Parameter.empty:
            return value
        if name in ("height", "width") and getattr(pipe, "default_sample_size", None):
            return pipe.default_sample_size * vae_spatial
        for key in sample_keys:
            sample = _config(transformer, key)
            if sample:
                return sample * (vae_spatial if name != "frames" else 1)
        return None

    height = default("height", ("sample_height", "sample_size"))
    width = default("width", ("sample_width", "sample_size"))
    frames_name = _frames_parameter(pipe)
    frames = default(frames_name, ("sample_frames",)) if frames_name else None
    if height is None or width is None or (frames_name and frames is None):
        raise ValueError(f"{type(pipe).__name__} names no default size: give height and width"
                         f"{' and frames' if frames_name else ''}")
    return Size(int(height), int(width), int(frames) if frames is not None else None)


def resolve_size(pipe, height: int | None = None, width: int | None = None, frames: int | None = None) -> Size:
    """The size to generate at: the given values, the checkpoint's defaults for the rest;
    refused, with the valid values named, where the pipeline cannot make it."""
    video = is_video(pipe)
    if frames is not None and not video:
        raise ValueError(f"frames={frames}: {type(pipe).__name__} makes images; it takes no frame count")
    given = {"height": height, "width": width, "frames": frames}
    defaults = default_size(pipe)
    size = Size(**{name: getattr(defaults, name) if value is None else value for name, value in given.items()})
    used = [name for name in given if getattr(size, name) is not None]
    defaulted = [name for name in used if given[name] is None]
    what = "" if not defaulted else " (the checkpoint's default size)" if defaulted == used else \
        f" ({' and '.join(defaulted)}: the checkpoint's default)"
    check_size_values(size.height, size.width, size.frames, what)

    shape = geometry(pipe)
    for name in ("height", "width"):
        value = getattr(size, name)
        if value % shape.spatial:
            lower = value // shape.spatial * shape.spatial
            nearest = ", ".join(str(v) for v in (lower, lower + shape.spatial) if v > 0)
            raise ValueError(f"{name}={value}{what if name in defaulted else ''} must be a multiple of {shape.spatial} "
                             f"({shape.spatial_why}) for this {type(pipe).__name__}; e.g. {nearest}")
    if video and shape.temporal > 1 and (size.frames - 1) % shape.temporal:
        lower = (size.frames - 1) // shape.temporal * shape.temporal + 1
        raise ValueError(f"frames={size.frames}{what if 'frames' in defaulted else ''} must be 1 + a multiple of "
                         f"{shape.temporal} (the VAE's temporal compression); e.g. {lower} or {lower + shape.temporal}")
    if shape.rope_positions is not None:
        _check_rope(pipe, size, shape, what)
    return size


def _check_rope(pipe, size: Size, shape: Geometry, what: str) -> None:
    """Wan's rotary embedding is a table of ``rope_max_seq_len`` positions per axis: a larger
    patch grid fails inside the forward with a reshape error."""
    transformer = pipe.transformer
    _, patch_t = _patch(transformer)
    positions = shape.rope_positions
    grid = {"height": size.height // shape.spatial, "width": size.width // shape.spatial}
    if size.frames is not None:
        grid["frames"] = ((size.frames - 1) // shape.temporal + 1) // patch_t
    over = [name for name, patches in grid.items() if patches > positions]
    if over:
        most_frames = (positions * patch_t - 1) * shape.temporal + 1
        limits = f"height and width at most {positions * shape.spatial}" + (
            f", frames at most {most_frames}" if size.frames is not None else "")
        raise ValueError(f"{size}{what}: {type(transformer).__name__}'s rotary embedding reaches {positions} patches per "
                         f"axis (rope_max_seq_len={positions}), and {', '.join(over)} would need more: "
                         f"{limits} for this checkpoint; name a smaller size")


def step_limit(pipe) -> int:
    """The most steps the pipeline's scheduler has distinct timesteps for."""
    trained = _config(getattr(pipe, "scheduler", None), "num_train_timesteps")
    return min(MAX_STEPS, int(trained)) if trained else MAX_STEPS


# -- one call ---------------------------------------------------------------------------------

class _FiniteLatents:
    """diffusers' ``callback_on_step_end``: stops a generation whose latents turn non-finite,
    naming the step (the output of every later step would be NaN too)."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        latents = callback_kwargs.get("latents")
        if latents is not None:
            check_finite_latents(latents, step, self.steps, timestep)
        return callback_kwargs


def check_finite_latents(latents: torch.Tensor, step: int, steps: int, timestep=None) -> None:
    """Raise ``FloatingPointError`` naming the step if ``latents`` hold NaN or Inf."""
    if not bool(torch.isfinite(latents).all()):
        nan = bool(torch.isnan(latents).any())
        at = f" (timestep {float(timestep):.1f})" if timestep is not None else ""
        raise FloatingPointError(
            f"the latents turned {'NaN' if nan else 'Inf'} at step {step + 1} of {steps}{at}: generation stopped, every "
            "later step and the output would be non-finite; the model's weights or the recipe diverge here")


def calibration_runs(pipe, count: int, *, steps: int, guidance_scale: float, size: Size) -> list[dict]:
    """The generations a calibration measures: ``count`` training captions of the reference
    world (never the held-out ones), seeds 0..count-1, latents only."""
    from cadence.reference import data

    captions = data.train_captions(count, video=is_video(pipe))
    return [call_arguments(pipe, caption, steps=steps, seed=seed, guidance_scale=guidance_scale, size=size,
                           decode=False) for seed, caption in enumerate(captions)]


def sampling(pipe, steps: int | None = None, guidance_scale: float | None = None) -> tuple[int, float]:
    """The step count and guidance a generation runs at: those given, else the pipeline's own
    (a distilled student's K steps and guidance 1: ``cadence.distill``), else 20 steps at 4.0."""
    if hasattr(pipe, "sampling_defaults"):
        return pipe.sampling_defaults(steps, guidance_scale)
    student = getattr(pipe, "student", None) or {}  # a student of a user's Wan / FLUX checkpoint (cadence.load)
    return (student.get("steps", 20) if steps is None else steps,
            student.get("guidance_scale", 4.0) if guidance_scale is None else guidance_scale)


def call_arguments(pipe, prompt: str, *, steps: int, seed: int, guidance_scale: float, size: Size,
                   decode: bool = True) -> dict:
    """The keyword arguments of ``pipe(...)`` for one generation, in the pipeline's own names.
    ``decode=False`` asks a diffusers pipeline for latents (calibration needs no pixels)."""
    names = parameters(pipe)
    arguments = {"prompt": prompt, "guidance_scale": guidance_scale,
                 "steps" if "steps" in names else "num_inference_steps": steps}
    if "seed" in names:
        arguments["seed"] = seed
    else:
        # A CPU generator draws the same noise whatever the device the pipeline runs on.
        arguments["generator"] = torch.Generator("cpu").manual_seed(seed)
    arguments.update(height=size.height, width=size.width)
    frames = _frames_parameter(pipe)
    if frames is not None:
        arguments[frames] = size.frames
    if "output_type" in names:
        arguments["output_type"] = "pt" if decode else "latent"
    if "callback_on_step_end" in names:
        arguments["callback_on_step_end"] = _FiniteLatents(steps)
    return arguments


def to_pixels(pipe, output) -> torch.Tensor:
    """The first output of a batch as float32 pixels in [-1, 1] on the CPU: (T, 3, H, W) for a
    video, (3, H, W) for an image."""
    if not torch.is_tensor(output):
        import numpy as np

        output = torch.from_numpy(np.asarray(output))
    pixels = output[0].detach().float().cpu()
    if "output_type" in parameters(pipe):  # diffusers' "pt" postprocessing gives [0, 1]
        pixels = pixels * 2 - 1
    return pixels.clamp(-1, 1)


def generate(pipe, prompt: str, *, steps: int, seed: int, guidance_scale: float, size: Size) -> torch.Tensor:
    """One generation -> pixels in [-1, 1], (T, 3, H, W) for a video, (3, H, W) for an image."""
    output = pipe(**call_arguments(pipe, prompt, steps=steps, seed=seed, guidance_scale=guidance_scale, size=size),
                  return_dict=False)[0]
    return to_pixels(pipe, output)
