"""``distill(teacher, out, steps=4, method="dmd")``: a few-step student of a reference model.

A run has two phases on one time budget (and, for exact tests, an optional step budget):
``ode_steps`` steps of ODE-pair regression (``ode_pairs.py``), then the method's: DMD2
(``dmd.py``) or consistency distillation (``consistency.py``), the two families issue 17 compares
at equal compute. The student is a copy of the teacher's transformer trained to run without CFG
(CFG distillation: the real score DMD matches, and the ODE the consistency target follows, are
the teacher's with CFG), one forward per step; its checkpoint says guidance 1, so
``cadence.load(out)`` runs it in K steps at its own sigmas with one forward each. Each method owns
its networks beside the student: DMD its critic (the fake score), consistency its EMA target;
both are part of the state.

The run folder is the student's diffusers checkpoint (``transformer/`` in bf16, the scheduler,
``model_index.json``), ``student.json`` (what the loader reads), ``loss.png``, ``samples.png``
(the teacher at ``sample_steps``, 50, with CFG beside the student, same conditions and noise), ``README.md``
and ``state/`` (``state.py``: everything a resumed run needs; delete it before shipping the
student). The state is written every ``save_every`` seconds and at the end; a run started on a
folder holding a state of the same settings, teacher and conditions (the embeddings file, or the
captions embedded here) resumes from it.

Every step draws from two seeded generators saved in the state (noise on the device, indices
on the CPU), and the learning rate depends on the step only, so on the CPU a run stopped at
step n and resumed is bit for bit the run that never stopped.

Judge evaluation (every ``eval_every`` seconds, on the held-out captions when the conditions
have them): the student's adherence and FD, and once the teacher's at ``sample_steps`` with
CFG, so the card sets one beside the other (hence ``eval_prompts`` and ``sample_steps`` are
part of the resumed identity: the teacher's scores are not recomputed). The student is judged,
and drawn in samples.png, through the weights it ships: rounded to bf16 as ``transformer/``
holds them, computed in fp32 as ``cadence.load`` runs them.

``method="self-forcing"`` (issue 18) trains a causal, chunk-wise student of a video teacher for
``cadence.stream``: the ODE-pair phase regresses every chunk at its own student step with the
teacher's clean earlier chunks as context, and the method's phase is DMD on the student's own
chunk-by-chunk rollouts (``self_forcing.py``), all through one block-causal forward that computes
what the stream's KV cache computes (``causal.py``). Its samples, judge scores and samples.png
are the stream's rollouts; student.json says ``causal`` and ``chunk_frames``.

A user's own Wan or FLUX checkpoint (a folder or a pipeline object) is distilled by the same
loop on conditions from the user's prompts (``prompts``, encoded once by the pipeline) in its VAE's
latent space at a pixel ``size``; its evaluation is PSNR/SSIM against the teacher's samples, not
the judge (the judge knows the procedural world only), and the run folder is a full diffusers
pipeline of the teacher's class. ``user.py`` says what differs and why (FLUX.1-dev's "teacher with
CFG" is the teacher at its embedded guidance).

Where the loop differs from DMD2's: no EMA of the student, a constant learning rate after a
100-step linear warm-up of each phase (DMD2: constant, no warm-up): the warm-up runs on the ODE
phase's steps and starts again at the first DMD step, for the generator and the critic, since
the generator's loss changes there and the critic takes its first step there (a warm-up on
global steps would end inside the ODE phase at the default ode_steps=200). Gradient clipping at
norm 1 as reference/train.py trains, fp32 on the CPU and bf16 autocast on CUDA. The consistency
phase keeps the same loop (its warm-up restarts at its first step too, where the student's loss
changes); its EMA target starts there as a copy of the student, and the student shipped is the
online network, not the target (the one the gradient trained).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from cadence.distill import consistency, dmd, ode_pairs, self_forcing, state, user
from cadence.distill.causal import block_causal
from cadence.distill.student import (
    Condition,
    Denoiser,
    euler,
    family,
    schedule_sigmas,
    student_pipeline,
    student_sigmas,
    trainable_copy,
)

METHODS = ("dmd", "consistency", "self-forcing")
# The settings only some methods read: they are not part of another method's resumed identity (a
# DMD run's state, written before the consistency and self-forcing settings existed, still resumes).
METHOD_SETTINGS = {
    "dmd": ("critic_updates", "critic_lr"),
    "consistency": ("ema_decay", "skip"),
    "self-forcing": ("critic_updates", "critic_lr", "chunk_frames"),
}
CAUSAL = ("self-forcing",)  # methods whose student is block-causal, chunk by chunk (self_forcing.py)
SIZE_KEYS = ("frames", "height", "width")
# Settings that may change between a run and its resumption: budgets and reporting only (none
# of them draws from the training generators). Not eval_prompts nor sample_steps: the teacher's
# judge evaluation, made once, was scored on those prompts at those steps.
RESUMABLE = ("seconds", "max_steps", "save_every", "eval_every", "sample_prompts")
WARMUP_STEPS = 100  # linear learning-rate warm-up at the start of each phase (ODE pairs, DMD)
CAPTIONS_SOURCE = "captions"  # the conditions' source when embedded here from the procedural captions
GIVEN_SOURCE = "given"  # ... when the caller passed a Conditions object (Python API), with its fingerprint


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 4  # the student's step count K
    method: str = "dmd"
    seconds: float = 600.0  # wall-clock budget of the optimisation, summed over resumptions
    max_steps: int | None = None  # training-step budget as well (None: time only)
    batch_size: int = 16
    lr: float = 1e-5  # student; constant after a 100-step warm-up in each phase (DMD2: constant)
    critic_lr: float = 1e-5
    guidance_scale: float = 4.0  # the real score's CFG: the teacher's sampling default (reference/train.py)
    critic_updates: int = 5  # fake-score steps per generator step (DMD2's TTUR: 5)
    ode_steps: int = 200  # ODE-pair regression steps before the method's phase
    ode_pairs: int = 256  # teacher trajectories recorded for that phase
    teacher_steps: int = 48  # Euler steps of the teacher's trajectories (ODE pairs; consistency's grid)
    ema_decay: float = consistency.EMA_DECAY  # consistency: the EMA target's decay (LCM's 0.95)
    skip: int = 1  # consistency: teacher grid intervals between the two points of a pair (LCM's k)
    seed: int = 0
    save_every: float = 300.0  # seconds between state saves (0: every step)
    eval_every: float | None = 600.0  # seconds between judge evaluations (None: none)
    eval_prompts: int = 8  # held-out captions the judge scores
    sample_prompts: int = 4  # rows of samples.png
    sample_steps: int = 50  # the teacher's steps beside the student in samples.png (issue 17's baseline)
    # frames/height/width (a reference teacher: latents; a Wan or FLUX: pixels); None: the teacher's own
    size: dict | None = field(default=None, hash=False)
    chunk_frames: int | None = None  # self-forcing: latent frames a chunk (the stream's frames_per_chunk)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; valid: {', '.join(METHODS)}")
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "critic_updates": self.critic_updates,
            "ode_pairs": self.ode_pairs,
            "teacher_steps": self.teacher_steps,
            "eval_prompts": self.eval_prompts,
            "sample_prompts": self.sample_prompts,
            "sample_steps": self.sample_steps,
            "skip": self.skip,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.ode_steps, int) or self.ode_steps < 0:
            raise ValueError(f"ode_steps={self.ode_steps!r} must be an integer >= 0 (0: no ODE-pair phase)")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps={self.max_steps!r} must be an integer >= 1, or None for the time budget only")
        for name in ("seconds", "lr", "critic_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 1.0):
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be >= 1 (1: the teacher without CFG)")
        if not (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in (0, 1): 0 < ema_decay < 1 (LCM: 0.95)")
        intervals = self.steps * ode_pairs.substeps(self.steps, self.teacher_steps)
        if self.skip > intervals:
            raise ValueError(
                f"skip={self.skip} is more than the teacher grid's {intervals} intervals "
                f"({self.steps} steps x {intervals // self.steps} teacher steps each); valid: 1 to {intervals}"
            )
        if self.save_every < 0:
            raise ValueError(f"save_every={self.save_every!r} must be >= 0 seconds (0: every step)")
        if self.eval_every is not None and not self.eval_every > 0:
            raise ValueError(f"eval_every={self.eval_every!r} must be > 0 seconds, or None for no evaluation")
        if self.method in CAUSAL:
            if isinstance(self.chunk_frames, bool) or not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
                raise ValueError(
                    f"chunk_frames={self.chunk_frames!r} must be an integer >= 1 for method={self.method!r} "
                    "(latent frames a chunk, dividing the clip's frames: e.g. 4 of ref-video's 16)"
                )
        elif self.chunk_frames is not None:
            raise ValueError(
                f"chunk_frames={self.chunk_frames!r} is read by the causal methods only "
                f"({', '.join(CAUSAL)}); method={self.method!r} takes chunk_frames=None"
            )
        unknown = set(self.size or {}) - set(SIZE_KEYS)
        if unknown:
            raise ValueError(f"size has {', '.join(sorted(unknown))}; valid keys: {', '.join(SIZE_KEYS)}")

    def identity(self) -> dict:
        """What makes two runs the same run (a resumption may change its budgets only); the other
        methods' settings are not read, so they are not part of it."""
        mine = set(METHOD_SETTINGS[self.method])
        unread = {name for method, names in METHOD_SETTINGS.items() if method != self.method for name in names} - mine
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE and k not in unread}


@dataclass
class Conditions:
    """Caption embeddings to distil on: ``tokens`` (N, L, D), FLUX's ``pooled`` (N, D); the
    empty caption (CFG's negative); held-out ones (with their captions, for the judge)."""

    tokens: torch.Tensor
    empty_tokens: torch.Tensor  # (1, L, D)
    pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None
    heldout_tokens: torch.Tensor | None = None
    heldout_pooled: torch.Tensor | None = None
    heldout_captions: list[str] | None = None

    def batch(self, index: torch.Tensor, device) -> Condition:
        return Condition(self.tokens[index], None if self.pooled is None else self.pooled[index]).to(device)

    def empty(self, batch: int, device) -> Condition:
        pooled = None if self.empty_pooled is None else self.empty_pooled.expand(batch, -1)
        return Condition(self.empty_tokens.expand(batch, -1, -1), pooled).to(device)

    def heldout(self, count: int, device) -> tuple[Condition, list[str] | None]:
        """The first ``count`` held-out conditions (the training ones where there are none)."""
        if self.heldout_tokens is None:
            return self.batch(torch.arange(min(count, len(self.tokens))), device), None
        pooled = None if self.heldout_pooled is None else self.heldout_pooled[:count]
        captions = None if self.heldout_captions is None else self.heldout_captions[:count]
        return Condition(self.heldout_tokens[:count], pooled).to(device), captions

    def fingerprint(self) -> str:
        """A hash of every tensor and caption: two Conditions with the same one distil the same run."""
        import hashlib

        digest = hashlib.sha256()
        for part in dataclasses.fields(self):
            value = getattr(self, part.name)
            if isinstance(value, torch.Tensor):
                digest.update(f"{part.name}{tuple(value.shape)}{value.dtype}".encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            elif value is not None:
                digest.update(f"{part.name}{json.dumps(value)}".encode())
        return digest.hexdigest()[:16]

    @classmethod
    def from_embeddings(cls, path: Path) -> Conditions:
        """The file reference/train.py trains on (``prepare_embeddings``)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = {k: v.float() for k, v in load_file(str(path)).items()}
        return cls(
            tokens=tensors["train_tokens"],
            pooled=tensors.get("train_pooled"),
            empty_tokens=tensors["empty_tokens"],
            empty_pooled=tensors.get("empty_pooled"),
            heldout_tokens=tensors.get("heldout_tokens"),
            heldout_pooled=tensors.get("heldout_pooled"),
            heldout_captions=json.loads(metadata["heldout"]) if "heldout" in metadata else None,
        )

    @classmethod
    def from_captions(cls, video: bool, count: int, heldout: int) -> Conditions:
        """Training and held-out captions of the procedural world, embedded here (text encoder)."""
        from cadence.reference import data
        from cadence.reference.text import embed_captions

        train, held = data.train_captions(count, seed=0, video=video), data.heldout_prompts(heldout, video=video)
        embedded = {
            name: {key: value.float() for key, value in embed_captions(captions).items()}
            for name, captions in (("train", train), ("heldout", held), ("empty", [""]))
        }
        return cls(
            tokens=embedded["train"]["tokens"],
            pooled=embedded["train"]["pooled"],
            empty_tokens=embedded["empty"]["tokens"],
            empty_pooled=embedded["empty"]["pooled"],
            heldout_tokens=embedded["heldout"]["tokens"],
            heldout_pooled=embedded["heldout"]["pooled"],
            heldout_captions=held,
        )


def open_teacher(teacher):
    """A pipeline, a reference model's name, or a checkpoint folder -> (pipeline, name to record)."""
    if not isinstance(teacher, (str, Path)):
        return teacher, type(teacher).__name__
    import cadence
    from cadence.reference.models import REFERENCE_MODELS

    if str(teacher) not in REFERENCE_MODELS and Path(teacher).is_dir():
        user.check_folder(Path(teacher))  # a folder of another pipeline is refused before its weights load
    pipe = cadence.load(str(teacher), text_encoder=False)
    return pipe, str(teacher)


def check_out(out: Path, settings: DistillSettings, teacher: str, source: str) -> bool:
    """-> whether ``out`` holds this run's state (resume). Refused: a folder holding anything
    else, or the state of a run with other settings, another teacher or other conditions
    (``source``: the embeddings file, ``"captions"``, or ``"given <fingerprint>"``; other captions
    would train the DMD phase on them while the recorded ODE pairs come from the old ones)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir() or not state.exists(out):
        raise ValueError(
            f"out={str(out)!r} exists and is not a distillation run's folder (no state/state.json): "
            "name a new or empty folder, or the folder of the run to resume"
        )
    record = state.read_record(out)
    mine = {"teacher": teacher, "conditions": source, **settings.identity()}
    theirs = {"teacher": record.get("teacher"), "conditions": record.get("conditions"), **record.get("settings", {})}
    different = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if different:
        listed = ", ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in different.items())
        raise ValueError(
            f"out={str(out)!r} holds another run's state ({listed}): resume it with the same settings, "
            "or name a new folder"
        )
    return True


def distill(
    teacher,
    out: Path | str,
    steps: int = 4,
    method: str = "dmd",
    seconds: float = 600.0,
    device: str = "cpu",
    settings: DistillSettings | None = None,
    conditions: Conditions | None = None,
    embeddings: Path | None = None,
    command: str = "cadence.distill.distill (Python)",
    progress: bool = True,
    prompts: Path | str | list[str] | None = None,
    negative_prompt: str = "",
) -> dict:
    """Train (or resume) a few-step student (``method``: dmd or consistency); -> the run's summary
    (also in student.json).

    ``settings`` wins over ``steps``/``method``/``seconds`` when given. ``conditions``: caption
    embeddings to distil on; else ``embeddings`` (reference/train.py's file; for a reference
    teacher ``.carry/embeddings-<name>.safetensors`` when it exists), else captions embedded here.
    A Wan or FLUX teacher (``user.py``) distils on ``prompts`` (a file, one a line, or a list)
    with ``negative_prompt`` as its CFG negative, unless ``conditions`` are given.
    """
    settings = settings or DistillSettings(steps=steps, method=method, seconds=seconds)
    out = Path(out)
    pipe, teacher_name = open_teacher(teacher)
    from cadence.generation import step_limit

    limit = step_limit(pipe)
    if settings.steps > limit:
        raise ValueError(
            f"steps={settings.steps} is more than the teacher's schedule of {limit} timesteps; valid: 1 to {limit}"
        )
    if family(pipe).startswith("ref-"):
        if prompts is not None:
            raise ValueError(
                f"prompts are for a Wan or FLUX teacher; {teacher_name} distils on its world's captions "
                "(--embeddings, or captions embedded here)"
            )
        size = dict(pipe.config.sample_size) | dict(settings.size or {})
        denoiser = Denoiser(pipe, size)
    else:
        size = user.resolve_size(pipe, settings.size)
        denoiser = Denoiser(pipe, size, settings.guidance_scale)
    if denoiser.video and "frames" not in size:
        raise ValueError("size: a video teacher needs frames, height and width")
    if not denoiser.video and "frames" in size:
        raise ValueError(f"size has frames={size['frames']}: the teacher makes images; valid keys: height, width")
    if settings.method in CAUSAL:
        if denoiser.family != "ref-video":
            raise ValueError(
                f"method={settings.method!r} trains a causal video student chunk by chunk; the teacher "
                f"{teacher_name} {f'is a {type(pipe).__name__}' if denoiser.video else 'makes images'}; "
                "valid: a reference video teacher (ref-video)"
            )
        self_forcing.check_chunks(size["frames"], settings.chunk_frames)
    heldout = max(settings.eval_prompts, settings.sample_prompts)
    if conditions is not None:
        source = f"{GIVEN_SOURCE} {conditions.fingerprint()}"
    elif not denoiser.reference:
        if embeddings is not None:
            raise ValueError(
                f"embeddings={str(embeddings)!r} are the reference models' caption embeddings; a Wan or FLUX "
                "teacher distils on its own encoding of --prompts"
            )
        prompts = user.read_prompts(prompts, heldout + 1)
        source = user.source(prompts, negative_prompt)
    else:
        embeddings = _embeddings_file(teacher_name, embeddings)
        source = CAPTIONS_SOURCE if embeddings is None else str(Path(embeddings).resolve())
    resume = check_out(out, settings, teacher_name, source)
    folder = Path(teacher) if isinstance(teacher, (str, Path)) and Path(teacher).is_dir() else None
    if conditions is None and not denoiser.reference:
        conditions = Conditions(**user.conditions(pipe, prompts, negative_prompt, heldout, settings.seed))
        if folder is not None:  # ours to change: the text encoders' memory is freed, write() links their files
            user.free_text_encoders(pipe)
    conditions = conditions or _conditions(denoiser.video, embeddings, settings)
    run = _Run(pipe, denoiser, settings, conditions, out, device, teacher_name, source, folder)
    if resume:
        run.restore()
    return run.train(command, progress)


def _embeddings_file(teacher: str, embeddings: Path | None) -> Path | None:
    """The embeddings file to distil on: the one named, else a reference teacher's own in
    ``.carry/`` when it exists, else None (captions embedded here)."""
    from cadence.reference.models import REFERENCE_MODELS

    if embeddings is None and teacher in REFERENCE_MODELS:
        default = Path(".carry") / f"embeddings-{teacher}.safetensors"
        embeddings = default if default.is_file() else None
    return embeddings


def _conditions(video: bool, embeddings: Path | None, settings: DistillSettings) -> Conditions:
    if embeddings is not None:
        return Conditions.from_embeddings(Path(embeddings))
    from cadence.reference.train import CAPTIONS

    return Conditions.from_captions(
        video, CAPTIONS["video" if video else "image"], max(settings.eval_prompts, settings.sample_prompts)
    )


class _Run:
    """One run's models, optimizers, generators and records."""

    def __init__(
        self,
        pipe,
        denoiser: Denoiser,
        settings: DistillSettings,
        conditions: Conditions,
        out: Path,
        device: str,
        teacher_name: str,
        source: str = GIVEN_SOURCE,
        teacher_folder: Path | None = None,
    ):
        self.pipe, self.denoiser, self.settings, self.conditions = pipe, denoiser, settings, conditions
        self.out, self.device, self.teacher_name, self.source = out, device, teacher_name, source
        self.teacher_folder = teacher_folder  # a Wan or FLUX teacher's folder: its freed text encoders' files
        self.teacher = pipe.transformer.to(device).float().eval().requires_grad_(False)
        self.student = trainable_copy(self.teacher)
        self.sigmas = student_sigmas(denoiser.scheduler, settings.steps)
        self.optimizers = {
            "student": torch.optim.AdamW(
                self.student.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.01
            )
        }
        # The method's own network: DMD's critic (trained), or consistency's EMA target (never by a gradient).
        self.critic = self.target = None
        self.causal = settings.method in CAUSAL  # the student streams: sampled and judged chunk by chunk
        if settings.method in ("dmd", *CAUSAL):
            self.critic = trainable_copy(self.teacher)
            self.optimizers["critic"] = torch.optim.AdamW(
                self.critic.parameters(), lr=settings.critic_lr, betas=(0.9, 0.99), weight_decay=0.01
            )
        if settings.method == "consistency":
            self.target = trainable_copy(self.teacher).eval().requires_grad_(False)
            self.grid, _ = ode_pairs.teacher_grid(self.sigmas, settings.teacher_steps)
        self.noise = torch.Generator(device).manual_seed(settings.seed)
        self.picker = torch.Generator().manual_seed(settings.seed)
        self.step, self.elapsed, self.history, self.evaluations = 0, 0.0, [], []
        self.teacher_evaluation: dict | None = None  # the judge on the teacher (sample_steps, CFG), once
        self.pairs: dict[str, torch.Tensor] | None = None
        self.judge = None
        self.teacher_samples: torch.Tensor | None = None  # a Wan or FLUX teacher's held-out samples (fidelity)

    # -- state ---------------------------------------------------------------------------

    def _state_parts(self):
        networks = {"critic": self.critic, "target": self.target}
        return (
            {"student": self.student} | {name: net for name, net in networks.items() if net is not None},
            self.optimizers,
            {"noise": self.noise, "picker": self.picker},
        )

    def restore(self) -> None:
        record = state.load(self.out, *self._state_parts())
        self.step, self.elapsed = record["step"], record["elapsed"]
        self.history, self.evaluations = record["history"], record["evaluations"]
        self.teacher_evaluation = record.get("teacher_evaluation")

    def save(self) -> None:
        record = {
            "teacher": self.teacher_name,
            "conditions": self.source,
            "settings": self.settings.identity(),
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "evaluations": self.evaluations,
            "teacher_evaluation": self.teacher_evaluation,
        }
        state.save(self.out, *self._state_parts(), record)

    # -- the two phases ------------------------------------------------------------------

    def _pairs(self) -> dict[str, torch.Tensor]:
        """The ODE pairs, recorded once (from their own seed) and kept in the state folder."""
        path = state.folder(self.out) / "ode_pairs.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            return {k: v.to(self.device) for k, v in load_file(str(path)).items()}
        s = self.settings
        recorder = torch.Generator(self.device).manual_seed(s.seed + 1)
        chosen = torch.randint(
            len(self.conditions.tokens), (s.ode_pairs,), generator=torch.Generator().manual_seed(s.seed + 1)
        )
        parts = []
        for start in range(0, s.ode_pairs, s.batch_size):
            index = chosen[start : start + s.batch_size]
            noise = self.denoiser.noise(len(index), recorder, self.device)
            parts.append(
                ode_pairs.record(
                    self.denoiser,
                    self.teacher,
                    noise,
                    self.sigmas,
                    s.teacher_steps,
                    self.conditions.batch(index, self.device),
                    self.conditions.empty(len(index), self.device),
                    s.guidance_scale,
                )
            )
        pairs = {
            "points": torch.cat([p["points"] for p in parts], 1),
            "x0": torch.cat([p["x0"] for p in parts]),
            "condition": chosen,
        }
        state.save_tensors(path, pairs)
        return {k: v.to(self.device) for k, v in pairs.items()}

    def _learning_rates(self) -> None:
        """A linear warm-up over each phase's first WARMUP_STEPS steps (a function of the step
        alone, so a resumed run sets the same rates)."""
        ode_steps = self.settings.ode_steps
        step_in_phase = self.step if self.step < ode_steps else self.step - ode_steps
        warm = min(1.0, (step_in_phase + 1) / WARMUP_STEPS)
        rates = {"student": self.settings.lr, "critic": self.settings.critic_lr}
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = rates[name] * warm

    def _update(self, name: str, loss: torch.Tensor) -> float:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        return float(loss.detach())

    def ode_step(self) -> dict:
        if self.pairs is None:
            self.pairs = self._pairs()
        s = self.settings
        index = torch.randint(self.pairs["x0"].shape[0], (s.batch_size,), generator=self.picker)
        index_d = index.to(self.device)
        condition = self.conditions.batch(self.pairs["condition"][index_d].cpu(), self.device)
        if self.causal:
            return {"phase": "ode", "ode": self._update("student", self._causal_regression(index_d, condition))}
        student_steps = torch.randint(s.steps, (s.batch_size,), generator=self.picker)
        loss = ode_pairs.regression_loss(
            self.denoiser,
            self.student,
            self.pairs["points"][:, index_d],
            self.pairs["x0"][index_d],
            self.sigmas,
            student_steps.to(self.device),
            condition,
        )
        return {"phase": "ode", "ode": self._update("student", loss)}

    def _causal_regression(self, index: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The ODE-pair loss of a causal student: an independent student step for every chunk."""
        s = self.settings
        chunks = self.denoiser.size["frames"] // s.chunk_frames
        steps = torch.randint(s.steps, (s.batch_size, chunks), generator=self.picker)
        with block_causal(self.student, s.chunk_frames) as causal:
            return self_forcing.regression_loss(
                causal,
                self.pairs["points"][:, index],
                self.pairs["x0"][index],
                self.sigmas,
                steps.to(self.device),
                condition,
            )

    def self_forcing_step(self) -> dict:
        """DMD on the student's own chunk-by-chunk rollouts (self_forcing.py): the critic's updates on
        fresh rollouts, then one generator update through each chunk's exit step."""
        with block_causal(self.student, self.settings.chunk_frames) as causal:
            return self._dmd_update(
                "self-forcing",
                lambda noise, step, condition: self_forcing.student_sample(causal, noise, self.sigmas, step, condition),
            )

    def dmd_step(self) -> dict:
        return self._dmd_update(
            "dmd",
            lambda noise, step, condition: dmd.student_sample(
                self.denoiser, self.student, noise, self.sigmas, step, condition
            ),
        )

    def _dmd_update(self, phase: str, sample) -> dict:
        """DMD2's step: ``critic_updates`` critic updates on fresh student samples (``sample(noise,
        step, condition)``, without gradient), then one generator update on another."""
        s, d = self.settings, self.denoiser
        critic_losses = []
        for _ in range(s.critic_updates):
            condition, step = self._draw()
            with torch.no_grad():
                x0 = sample(d.noise(s.batch_size, self.noise, self.device), step, condition)
            critic_losses.append(self._update("critic", dmd.critic_loss(d, self.critic, x0, condition, self.noise)))
        condition, step = self._draw()
        x0 = sample(d.noise(s.batch_size, self.noise, self.device), step, condition)
        loss = dmd.generator_loss(
            d,
            self.teacher,
            self.critic,
            x0,
            condition,
            self.conditions.empty(s.batch_size, self.device),
            s.guidance_scale,
            self.noise,
        )
        return {
            "phase": phase,
            "generator": self._update("student", loss),
            "critic": sum(critic_losses) / len(critic_losses),
        }

    def consistency_step(self) -> dict:
        """One consistency update on a fresh batch: teacher samples (the ODE pairs' ends), fresh
        noise, one teacher grid index per sample."""
        if self.pairs is None:
            self.pairs = self._pairs()
        s = self.settings
        index = torch.randint(self.pairs["x0"].shape[0], (s.batch_size,), generator=self.picker)
        grid_index = torch.randint(len(self.grid) - 1, (s.batch_size,), generator=self.picker)
        x0 = self.pairs["x0"][index.to(self.device)]
        noise = torch.randn(x0.shape, generator=self.noise, device=self.device)
        condition = self.conditions.batch(self.pairs["condition"][index.to(self.device)].cpu(), self.device)
        return self.consistency_update(x0, noise, grid_index.to(self.device), condition)

    def consistency_update(
        self, x0: torch.Tensor, noise: torch.Tensor, grid_index: torch.Tensor, condition: Condition
    ) -> dict:
        """The student's step on d(f_student, f_target) and the target's EMA step after it. The
        target starts as the student at the phase's first step (after the ODE-pair phase)."""
        s = self.settings
        if self.step == s.ode_steps:
            self.target.load_state_dict(self.student.state_dict())
        loss = consistency.consistency_loss(
            self.denoiser,
            self.student,
            self.teacher,
            self.target,
            x0,
            noise,
            self.grid,
            grid_index,
            s.skip,
            condition,
            self.conditions.empty(x0.shape[0], self.device),
            s.guidance_scale,
        )
        record = {"phase": "consistency", "consistency": self._update("student", loss)}
        consistency.update_target(self.target, self.student, s.ema_decay)
        return record

    def _draw(self) -> tuple[Condition, int]:
        """A batch of conditions and the student step to train (one per batch, as DMD2 does)."""
        index = torch.randint(len(self.conditions.tokens), (self.settings.batch_size,), generator=self.picker)
        step = int(torch.randint(self.settings.steps, (1,), generator=self.picker))
        return self.conditions.batch(index, self.device), step

    def method_step(self) -> dict:
        steps = {"dmd": self.dmd_step, "consistency": self.consistency_step, "self-forcing": self.self_forcing_step}
        return steps[self.settings.method]()

    # -- the loop ------------------------------------------------------------------------

    def _precision(self) -> contextlib.AbstractContextManager:
        """On CUDA, bf16 autocast with reference/train.py's attention backends (cuDNN's backward
        fails on ref-image there); on the CPU, plain fp32, which is what makes resumption exact."""
        if not str(self.device).startswith("cuda"):
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        from cadence.reference.train import TRAIN_ATTENTION

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        stack.enter_context(sdpa_kernel(TRAIN_ATTENTION))
        return stack

    def _more(self) -> bool:
        s = self.settings
        return self.elapsed < s.seconds and (s.max_steps is None or self.step < s.max_steps)

    def train(self, command: str, progress: bool) -> dict:
        s = self.settings
        bar = tqdm(
            desc=f"distill {self.teacher_name} -> {s.steps} steps",
            unit="step",
            initial=self.step,
            total=s.max_steps,
            disable=not progress,
        )
        start, last_save, last_eval = time.time() - self.elapsed, time.time(), time.time()
        if not state.exists(self.out):
            self.save()  # a run killed before its first periodic save still resumes (check_out needs a state)
        while self._more():
            self._learning_rates()
            with self._precision():
                record = self.ode_step() if self.step < s.ode_steps else self.method_step()
            self.history.append({"step": self.step, **record})
            self.step += 1
            self.elapsed = time.time() - start
            bar.update()
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "phase"} | {"phase": record["phase"]})
            if s.eval_every is not None and time.time() - last_eval >= s.eval_every:
                self.evaluate()
                last_eval = time.time()
            if time.time() - last_save >= s.save_every:
                self.save()
                last_save = time.time()
        bar.close()
        if (
            s.eval_every is not None
            and self.conditions.heldout_captions
            and (not self.evaluations or self.evaluations[-1]["step"] != self.step)
        ):
            self.evaluate()
        self.save()
        return self.write(command)

    # -- judging and writing ---------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, transformer, condition: Condition, grid: list[float], guidance_scale: float = 1.0, seed: int = 0
    ) -> torch.Tensor:
        """Pixels of a generation from fixed noise (one seed per run of rows: same noise for
        teacher and student); a causal student's chunk by chunk, as the stream runs it."""
        noise = self.denoiser.noise(
            condition.tokens.shape[0], torch.Generator(self.device).manual_seed(seed), self.device
        )
        if self.causal and transformer is not self.teacher:
            with block_causal(transformer, self.settings.chunk_frames) as student:
                return self.denoiser.pixels(self_forcing.generate(student, noise, grid[:-1], condition))
        empty = self.conditions.empty(condition.tokens.shape[0], self.device)
        x, _ = euler(self.denoiser, transformer, noise, grid, condition, empty, guidance_scale)
        return self.denoiser.pixels(x)

    def evaluate(self) -> None:
        """Adherence and FD of the student on held-out captions (skipped without captions)."""
        condition, captions = self.conditions.heldout(self.settings.eval_prompts, self.device)
        if not captions:
            return
        if not self.denoiser.reference:
            self.evaluate_fidelity(condition)
            return
        from cadence.judge import checkpoint
        from cadence.judge.score import judge_clips

        if self.judge is None:
            self.judge = checkpoint.load(device=self.device)
        if self.teacher_evaluation is None:
            grid = [*schedule_sigmas(self.denoiser.scheduler, self.settings.sample_steps), 0.0]
            clips = list(self.generate(self.teacher, condition, grid, self.settings.guidance_scale))
            scores = judge_clips(clips, captions, self.judge)
            self.teacher_evaluation = {
                "steps": self.settings.sample_steps,
                "guidance_scale": self.settings.guidance_scale,
                "adherence": scores["adherence"],
                "fd": scores["fd"],
            }
        clips = list(self.generate(self.shipped().float(), condition, [*self.sigmas, 0.0]))
        scores = judge_clips(clips, captions, self.judge)
        self.evaluations.append(
            {"step": self.step, "elapsed": round(self.elapsed, 1), "adherence": scores["adherence"], "fd": scores["fd"]}
        )

    def evaluate_fidelity(self, condition: Condition) -> None:
        """A Wan or FLUX student's PSNR and SSIM against its teacher's samples (``sample_steps``,
        the teacher's CFG or embedded guidance) on the held-out prompts, same noise: the judge
        scores the procedural world only. The teacher's samples are drawn once a process."""
        if self.teacher_samples is None:
            grid = [*schedule_sigmas(self.denoiser.scheduler, self.settings.sample_steps), 0.0]
            self.teacher_samples = self.generate(self.teacher, condition, grid, self.settings.guidance_scale)
        student = self.generate(self.shipped().float(), condition, [*self.sigmas, 0.0])
        self.evaluations.append(
            {"step": self.step, "elapsed": round(self.elapsed, 1), **user.fidelity(student, self.teacher_samples)}
        )

    def shipped(self) -> torch.nn.Module:
        """The student as ``transformer/`` holds it: a bf16 copy (``.float()`` of it is what
        ``cadence.load`` runs, and what the judge and samples.png see)."""
        return copy.deepcopy(self.student).eval().requires_grad_(False).to(torch.bfloat16)

    def write(self, command: str) -> dict:
        from cadence.distill import report

        self.out.mkdir(parents=True, exist_ok=True)
        size = self.denoiser.size
        shipped = self.shipped()
        pipe = student_pipeline(self.pipe, shipped, self.sigmas, size, self.denoiser.scheduler)
        if self.denoiser.reference:
            # Shards of at most 12 MB: a file that comes back from the GPU machine is at most 16 MiB.
            pipe.save_pretrained(str(self.out), safe_serialization=True, max_shard_size="12MB")
        else:
            user.write_folder(pipe, self.out, self.teacher_folder)
        summary = {
            "method": self.settings.method,
            "steps": self.settings.steps,
            "sigmas": self.sigmas,
            "guidance_scale": self.denoiser.guidance or 1.0,  # FLUX.1-dev: its embedded guidance, one forward
            "family": self.denoiser.family,
            "teacher": self.teacher_name,
            "teacher_guidance_scale": self.settings.guidance_scale,
            "command": command,
            "device": _device_name(self.device),
            "seconds": round(self.elapsed, 1),
            "steps_trained": self.step,
            "ode_steps": min(self.step, self.settings.ode_steps),
            "size": size,
            "torch": torch.__version__,
            "date": date.today().isoformat(),
            "settings": dataclasses.asdict(self.settings),
            "evaluations": self.evaluations,
            "evaluated_weights": "bfloat16, as shipped in transformer/ (computed in float32)",
            "teacher_evaluation": self.teacher_evaluation,
        }
        if not self.denoiser.reference:  # the prompts the card's evaluation and samples are of
            summary["heldout_prompts"] = self.conditions.heldout_captions
        if self.causal:  # what cadence.stream needs to run it as trained
            summary |= {"causal": True, "chunk_frames": self.settings.chunk_frames}
        (self.out / "student.json").write_text(json.dumps(summary, indent=1))
        report.plot_losses(self.history, self.evaluations, self.out / "loss.png")
        condition, captions = self.conditions.heldout(self.settings.sample_prompts, self.device)
        teacher_grid = [*schedule_sigmas(self.denoiser.scheduler, self.settings.sample_steps), 0.0]
        teacher = self.generate(self.teacher, condition, teacher_grid, self.settings.guidance_scale)
        student = self.generate(shipped.float(), condition, [*self.sigmas, 0.0])
        labels = captions or [f"condition {i}" for i in range(condition.tokens.shape[0])]
        guidance = report.teacher_guidance(summary) if self.denoiser.family == "flux" else None
        report.plot_samples(teacher, student, labels, self.settings, self.out / "samples.png", guidance)
        (self.out / "README.md").write_text(report.card(summary))
        return summary


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or "cpu"
