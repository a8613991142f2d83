"""A user's own checkpoint as a teacher: a local Wan (``WanPipeline``) or FLUX (``FluxPipeline``)
folder, as ``pipe.save_pretrained(dir)`` writes it, or such a pipeline object.

It is distilled by the reference models' code path (``trainer.py``); what differs lives here,
with the two pieces the rest of distill and ``cadence.loading`` share about pipeline kinds: ``family``
(reference, Wan or FLUX) and ``StudentScheduler`` (this module imports nothing of distill, so both
can import it without a circle):

- Conditions come from the user's prompts (``--prompts FILE``, one a line, blank lines skipped),
  encoded once with the pipeline's own ``encode_prompt`` (Wan: UMT5, with the negative prompt as
  the teacher's CFG negative; FLUX: T5 tokens and the CLIP pooled vector), after which a teacher
  opened from a folder drops its text encoders (a pipeline object given by the caller is left as
  it was). Held out from training, for the card's samples and evaluation:
  ``max(eval_prompts, sample_prompts)`` prompts chosen by a permutation seeded with the run's seed,
  so the same file and seed hold out the same prompts.
- Latents are the pipeline's own (``latent_size``): the size is given in pixels and checked by
  ``cadence.generation.resolve_size`` (multiples of the VAE scale and patch, Wan's rotary reach);
  with none given, the pipeline's default is taken if it is small (``SMALL_DEFAULT_TOKENS``).
- The teacher's trajectories follow its own scheduler and shift; FLUX shifts by resolution
  (``use_dynamic_shifting``), which at one size is a fixed shift (``fixed_shift``).
- FLUX.1-dev is guidance-distilled: it takes a ``guidance`` embedding and runs without CFG, so
  the "teacher with CFG" of DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for
  Fast Image Synthesis", arXiv 2405.14867: the real score is the teacher with CFG) and the guided
  ODE of the consistency method are here the teacher at its guidance value (``guidance_scale``, FLUX.1-dev's default 3.5 in diffusers) with one forward;
  the student keeps that embedding at the same value, which is its default guidance when loaded.
- The judge knows the procedural world only: for a user's model, adherence and FD are not
  measured; the evaluation is the student's PSNR and SSIM (``cadence.bench.metrics``) against the
  teacher's samples at ``sample_steps`` on the held-out prompts, same noise (``fidelity``).
- The output is a full diffusers pipeline folder of the teacher's class (``write_folder``): the
  student's transformer, the scheduler at shift 1 (the student's sigmas in ``student.json``, as a
  reference student's), the VAE, and the text encoders and tokenizers linked (hard links, else
  copies) from the teacher's folder when they were dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

PIPELINES = ("WanPipeline", "FluxPipeline")  # the user's pipelines cadence distils
REFERENCE_PIPELINES = ("RefVideoPipeline", "RefImagePipeline")
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# The most latent tokens a sample of a pipeline's default size may have to be taken without a --height /
# --width (/ --frames): FLUX's 1024 x 1024 is 4096; Wan's 480 x 832 x 81 is 32760 and must be asked for.
SMALL_DEFAULT_TOKENS = 4096


def family(pipe) -> str:
    """Which pipeline family ``pipe`` is: the reference pipelines, or a user's Wan or FLUX."""
    from diffusers import FluxPipeline, WanPipeline

    from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline

    families = {RefVideoPipeline: "ref-video", RefImagePipeline: "ref-image", WanPipeline: "wan", FluxPipeline: "flux"}
    kind = next((name for cls, name in families.items() if isinstance(pipe, cls)), None)
    if kind is None:
        raise ValueError(
            f"the teacher is a {type(pipe).__name__}; cadence distill trains students of "
            f"{', '.join(cls.__name__ for cls in families)}"
        )
    if kind == "wan" and (pipe.transformer_2 is not None or pipe.config.get("expand_timesteps")):
        raise ValueError(
            "the teacher is a Wan2.2 pipeline (two experts, or per-token timesteps: expand_timesteps); cadence "
            "distill trains students of single-transformer Wan2.1-style WanPipelines"
        )
    return kind


class StudentScheduler(FlowMatchEulerDiscreteScheduler):
    """A student's scheduler (shift 1) inside a diffusers pipeline, which calls ``set_timesteps``
    itself: every K-step schedule asked of it is the student's K sigmas, as the reference
    pipelines set them (``_RefPipeline._denoise``). WanPipeline asks for K steps, FluxPipeline for
    its K default sigmas; a caller's own K sigmas are replaced too (the student runs at no others)."""

    student_sigmas: tuple[float, ...] = ()

    @classmethod
    def of(cls, config, sigmas: list[float]) -> StudentScheduler:
        """A scheduler of ``config`` (shift 1, no dynamic shifting) running ``sigmas`` at K steps."""
        if config.get("shift", 1.0) != 1.0 or config.get("use_dynamic_shifting"):
            raise ValueError(
                f"a student's scheduler must have shift 1 and no dynamic shifting (its sigmas are "
                f"stored shifted), this one has shift={config.get('shift')}"
            )
        scheduler = cls.from_config(config)
        scheduler.student_sigmas = tuple(float(s) for s in sigmas)
        return scheduler

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        given = sigmas if sigmas is not None else timesteps
        asked = num_inference_steps if num_inference_steps is not None else None if given is None else len(given)
        if asked == len(self.student_sigmas):
            return super().set_timesteps(device=device, sigmas=list(self.student_sigmas))
        return super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)


def check_folder(path: Path) -> None:
    """Refuse, before loading anything, a folder that holds no pipeline cadence distils."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"teacher {str(path)!r} is not a diffusers pipeline folder (no model_index.json); cadence distill "
            f"takes ref-video, ref-image, or a folder of a {' or '.join(PIPELINES)} (pipe.save_pretrained(dir))"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{index}: not valid JSON ({error}); the checkpoint is damaged") from None
    if class_name not in (*PIPELINES, *REFERENCE_PIPELINES):
        raise ValueError(
            f"teacher {str(path)!r} is a {class_name}; cadence distill trains students of "
            f"{', '.join((*REFERENCE_PIPELINES, *PIPELINES))}"
        )


def read_prompts(prompts, needed: int) -> list[str]:
    """The prompts of a file (one a line) or a list; refused with fewer than ``needed``."""
    if prompts is None:
        raise ValueError(
            "a Wan or FLUX teacher needs prompts to distil on: --prompts FILE, one prompt a line "
            f"(at least {needed}: the held-out ones and one to train on)"
        )
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"--prompts {str(path)!r} is not a file; give a text file of prompts, one a line")
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = list(prompts)
    lines = [line.strip() for line in lines if line.strip()]
    if len(lines) < needed:
        raise ValueError(
            f"--prompts has {len(lines)} prompt(s); {needed} are needed: max(eval_prompts, sample_prompts) = "
            f"{needed - 1} held out for the samples and evaluation, and at least one to train on"
        )
    return lines


def split(prompts: list[str], heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """-> (training prompts, held-out prompts): ``heldout`` of them by a permutation of ``seed``."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:heldout])
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in order[:heldout]]


def source(prompts: list[str], negative_prompt: str) -> str:
    """The conditions' identity in a run's state: a resumption on other prompts is refused."""
    digest = hashlib.sha256(json.dumps([prompts, negative_prompt]).encode()).hexdigest()[:16]
    return f"prompts {digest}"


@torch.no_grad()
def encode(pipe, prompts: list[str]):
    """Embeddings of every prompt -> (tokens (N, L, D), pooled (N, D) or None), on the CPU."""
    if family(pipe) == "flux":
        tokens, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu")
        return tokens.float().cpu(), pooled.float().cpu()
    tokens, _ = pipe.encode_prompt(
        prompt=prompts, negative_prompt=None, do_classifier_free_guidance=False, device="cpu"
    )
    return tokens.float().cpu(), None


def conditions(pipe, prompts: list[str], negative_prompt: str, heldout: int, seed: int) -> dict:
    """The fields of the run's ``trainer.Conditions`` from the user's prompts; the empty condition
    is the negative prompt's (Wan's CFG; unused by FLUX, which runs without CFG)."""
    missing = [name for name in ("text_encoder", "tokenizer") if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(
            f"the teacher has no {' and '.join(missing)}: its prompts cannot be encoded; give the full pipeline "
            "folder (the one pipe.save_pretrained writes)"
        )
    train, held = split(prompts, heldout, seed)
    tokens, pooled = encode(pipe, train)
    held_tokens, held_pooled = encode(pipe, held)
    empty_tokens, empty_pooled = encode(pipe, [negative_prompt])  # Wan encodes its negative prompt the same way
    return {
        "tokens": tokens,
        "pooled": pooled,
        "empty_tokens": empty_tokens,
        "empty_pooled": empty_pooled,
        "heldout_tokens": held_tokens,
        "heldout_pooled": held_pooled,
        "heldout_captions": held,
    }


def free_text_encoders(pipe) -> None:
    """Drop the text encoders of a pipeline cadence opened (Wan's UMT5-XXL is 5.7B parameters):
    ``write_folder`` links them from the teacher's folder."""
    for name in TEXT_COMPONENTS:
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)


def resolve_size(pipe, given: dict | None) -> dict:
    """The pixel size to distil at: the one given, checked, else the pipeline's default if small."""
    from cadence.generation import resolve_size as resolve

    given = dict(given or {})
    size = resolve(pipe, given.get("height"), given.get("width"), given.get("frames"))
    size = {k: v for k, v in (("frames", size.frames), ("height", size.height), ("width", size.width)) if v}
    if not given:
        tokens = math.prod(latent_size(pipe, size).values()) // 4  # Wan's 1 x 2 x 2 patches, FLUX's 2 x 2 packing
        if tokens > SMALL_DEFAULT_TOKENS:
            raise ValueError(
                f"no size given, and {type(pipe).__name__}'s default {size} makes {tokens} latent tokens a sample "
                f"(more than {SMALL_DEFAULT_TOKENS}); name the size to distil at: --height, --width"
                + (", --frames" if "frames" in size else "")
            )
    return size


def latent_size(pipe, size: dict) -> dict:
    """Pixels -> the pipeline's latent grid (frames, height, width), as its prepare_latents makes it."""
    if "frames" in size:
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        return {
            "frames": (size["frames"] - 1) // temporal + 1,
            "height": size["height"] // spatial,
            "width": size["width"] // spatial,
        }
    scale = pipe.vae_scale_factor * 2  # FluxPipeline: latents of an even side, packed 2 x 2
    return {"height": 2 * (size["height"] // scale), "width": 2 * (size["width"] // scale)}


def fixed_shift(pipe, size: dict):
    """The teacher's scheduler at ``size``: FLUX's resolution-dependent shift (mu of the packed
    sequence length, as FluxPipeline computes it) is, at one size, the fixed shift exp(mu)
    (exponential time shift) or mu (linear); a fixed-shift scheduler is returned as it is."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    if not config.get("use_dynamic_shifting"):
        return pipe.scheduler
    latent = latent_size(pipe, size)
    mu = calculate_shift(
        latent["height"] * latent["width"] // 4,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift, use_dynamic_shifting=False)


@torch.no_grad()
def decode(denoiser, x: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels in [-1, 1] through the VAE as the pipeline decodes: videos (B, T, 3, H, W),
    images (B, 3, H, W), on the CPU."""
    from cadence.reference.pipelines import unpack

    vae = denoiser.vae.to(x.device)
    config = vae.config
    if denoiser.video:
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=x.device).view(shape)
        std = torch.tensor(config.latents_std, device=x.device).view(shape)
        video = vae.decode((x * std + mean).to(vae.dtype), return_dict=False)[0]  # (B, 3, T, H, W)
        return video.float().clamp(-1, 1).permute(0, 2, 1, 3, 4).cpu()
    latents = unpack(x, denoiser.latent["height"], denoiser.latent["width"])
    latents = latents / config.scaling_factor + config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1).cpu()


def fidelity(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """The student's mean PSNR (dB) and SSIM against the teacher's samples, sample by sample."""
    from cadence.bench.metrics import psnr, ssim

    pairs = list(zip(student, teacher))
    return {
        "psnr": sum(psnr(s, t) for s, t in pairs) / len(pairs),
        "ssim": sum(ssim(s, t) for s, t in pairs) / len(pairs),
    }


def write_folder(student_pipe, out: Path, teacher_folder: Path | None) -> None:
    """Save the student's pipeline to ``out``; the components it lacks (text encoders dropped
    after encoding) are linked from the teacher's folder, and named in model_index.json as there."""
    student_pipe.save_pretrained(str(out), safe_serialization=True)
    missing = [name for name, module in student_pipe.components.items() if module is None]
    if teacher_folder is None or not missing:
        return
    theirs = json.loads((teacher_folder / "model_index.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    for name in missing:
        if (teacher_folder / name).is_dir() and theirs.get(name, [None])[0] is not None:
            _link_tree(teacher_folder / name, out / name)
            index[name] = theirs[name]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` whose files are hard links where the file system allows."""
    shutil.rmtree(target, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)
