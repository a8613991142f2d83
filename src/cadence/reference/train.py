"""Train a reference model with rectified flow (flow matching) on procedural clips.

x_t = (1 - sigma) x_0 + sigma * noise; the transformer predicts the velocity noise - x_0
at timestep 1000 * sigma, sigma ~ logit-normal (SD3). Captions are dropped 10 % of the
time (replaced by the empty caption) so the model supports classifier-free guidance.

The GPU machine has no text encoder, so caption embeddings are computed beforehand on a
machine that has it (``prepare_embeddings``) and travel as one safetensors file.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from cadence.reference import data
from cadence.reference.models import ReferenceModel, reference_model

CAPTIONS = {"video": 1536, "image": 1024}  # distinct training captions (embeddings travel: <64 MiB)
SAMPLE_PROMPTS = 8
EVAL_CLIPS = 128  # held-out clips for the generalisation loss
# cuDNN attention's backward fails on ref-image's 280-token joint sequence in bf16 on an
# H100 (torch 2.11+cu130: "mha_graph.execute ... is_good()"), so training leaves it out.
TRAIN_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PRECISION_NOTE = {
    "bf16": "bf16 autocast",
    "tf32": "fp32 weights and activations with TF32 matmuls",
}
PRECISIONS = tuple(PRECISION_NOTE)


@dataclass
class TrainSettings:
    seconds: float = 480.0  # wall-clock budget for the optimisation loop
    batch_size: int = 64
    lr: float = 4e-4
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    seed: int = 0
    sample_steps: int = 30
    guidance_scale: float = 4.0
    precision: str = "bf16"  # "bf16" (autocast) or "tf32" (fp32 weights and activations, TF32 matmuls)
    compile: bool = True  # regional torch.compile of the repeated blocks (CUDA only)
    # Progressive training: a run at a smaller frame side first, then one at the model's own
    # that starts from it (`init`). The transformer sees positions, not pixels, so the same
    # weights run at any size that is a multiple of the patch.
    size: int | None = None  # frame side in pixels; None: the model's own
    init: Path | None = None  # a checkpoint folder (with transformer/) whose weights start the run

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.seconds <= 0 or self.batch_size <= 0:
            raise ValueError(f"seconds={self.seconds} and batch_size={self.batch_size} must be positive")
        if self.size is not None and self.size < 4:
            raise ValueError(f"size={self.size}: a frame side in pixels, at least 4")
        if self.init is not None and not (Path(self.init) / "transformer" / "config.json").is_file():
            raise ValueError(f"init={str(self.init)!r} holds no transformer/config.json: give a checkpoint folder "
                             "that `cadence train` wrote")

    def side(self, model: ReferenceModel) -> int:
        return self.size or model.sample["height"]


def prepare_embeddings(model: ReferenceModel, path: Path) -> Path:
    """Embed the training captions, the held-out sample prompts and the empty caption."""
    from cadence.reference.text import embed_captions

    video = model.task == "video"
    train = data.train_captions(CAPTIONS[model.task], seed=0, video=video)
    heldout = data.heldout_prompts(SAMPLE_PROMPTS, video=video)
    evaluation = [data.caption(s, video=video) for s in data.sample_specs(EVAL_CLIPS, seed=99, split="heldout", video=video)]
    embedded = {}
    for split, captions in (("train", train), ("heldout", heldout), ("eval", evaluation), ("empty", [""])):
        for key, value in embed_captions(captions).items():
            embedded[f"{split}_{key}"] = value
    metadata = {"train": json.dumps(train), "heldout": json.dumps(heldout), "eval": json.dumps(evaluation), "model": model.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(embedded, str(path), metadata=metadata)
    return path


def load_embeddings(path: Path, model: ReferenceModel, device) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    if metadata.get("model") != model.name:
        raise ValueError(f"embeddings {str(path)!r} were made for {metadata.get('model')!r}, not {model.name!r}")
    tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in load_file(str(path)).items()}
    return tensors, {k: json.loads(metadata[k]) for k in ("train", "heldout", "eval")}


def _batch(model: ReferenceModel, specs, seed: int, device, size: int | None = None) -> torch.Tensor:
    size = size or model.sample["height"]
    if model.task == "video":
        return data.render(specs, frames=model.sample["frames"], size=size, seed=seed, device=device)
    return data.render_images(specs, size=size, seed=seed, device=device)


def _predict(model: ReferenceModel, transformer, x0_shape, noisy, sigma, tokens, pooled):
    """Run the transformer as the pipeline does; returns the velocity in x's layout."""
    from cadence.reference.pipelines import image_ids, pack, unpack

    if model.task == "video":
        return transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=tokens, return_dict=False)[0]
    h, w = x0_shape[-2:]
    out = transformer(
        hidden_states=pack(noisy), timestep=sigma, encoder_hidden_states=tokens, pooled_projections=pooled,
        img_ids=image_ids(h, w, noisy.device), txt_ids=torch.zeros(tokens.shape[1], 3, device=noisy.device),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def flow_matching_loss(model, transformer, x0, tokens, pooled, generator) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, device=x0.device))
    shape = (-1,) + (1,) * (x0.dim() - 1)
    noisy = (1 - sigma.view(shape)) * x0 + sigma.view(shape) * noise
    velocity = _predict(model, transformer, x0.shape, noisy, sigma, tokens, pooled)
    return torch.nn.functional.mse_loss(velocity.float(), noise - x0)


def train(name: str, embeddings: Path, out: Path, settings: TrainSettings, device: str = "cuda") -> dict:
    model = reference_model(name)
    torch.manual_seed(settings.seed)
    tensors, captions = load_embeddings(embeddings, model, device)
    video = model.task == "video"
    specs = [data.parse_caption(c) for c in captions["train"]]
    transformer = _initial(model, settings.init).to(device).train()
    compiled = settings.compile and device.startswith("cuda")
    if compiled:
        # The eager step is dominated by fp32 norm/modulation elementwise kernels, which this
        # fuses; with the foreach EMA below it about doubles the training steps per second
        # (benchmarks/RESULTS.md, "Training the reference models").
        transformer.compile_repeated_blocks()
    ema = model.build().to(device).eval().requires_grad_(False)
    ema.load_state_dict(transformer.state_dict())
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.01)
    generator = torch.Generator(device).manual_seed(settings.seed)
    picker = torch.Generator().manual_seed(settings.seed)
    use_bf16 = device.startswith("cuda") and settings.precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = True

    ema_parameters, parameters = list(ema.parameters()), list(transformer.parameters())
    losses, step, start = [], 0, time.time()
    progress = tqdm(desc=f"train {name}", unit="step")
    while (elapsed := time.time() - start) < settings.seconds:
        fraction = elapsed / settings.seconds
        lr = settings.lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(specs), (settings.batch_size,), generator=picker)
        x0 = _batch(model, [specs[i] for i in index.tolist()], seed=settings.seed * 1_000_003 + step, device=device,
                    size=settings.side(model))
        tokens, pooled = tensors["train_tokens"][index.to(device)], tensors["train_pooled"][index.to(device)]
        drop = torch.rand(settings.batch_size, generator=picker).to(device) < settings.caption_dropout
        tokens = torch.where(drop[:, None, None], tensors["empty_tokens"], tokens)
        pooled = torch.where(drop[:, None], tensors["empty_pooled"], pooled)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16), sdpa_kernel(TRAIN_ATTENTION):
            loss = flow_matching_loss(model, transformer, x0, tokens, pooled, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - decay)
        # float() syncs every step; keeping loss.detach() instead measured a 12 MB-per-step
        # leak on CUDA (torch 2.11), an OOM after 5,000 steps.
        losses.append(float(loss))
        step += 1
        progress.update()
        if step % 100 == 0:
            progress.set_postfix(loss=f"{sum(losses[-100:]) / 100:.4f}", lr=f"{lr:.1e}")
    progress.close()
    train_seconds = time.time() - start

    heldout_loss = _heldout_loss(model, ema, tensors, captions, device, use_bf16, settings.side(model))
    out.mkdir(parents=True, exist_ok=True)
    # Shards of at most 12 MB: a file that comes back from the GPU machine is at most 16 MiB.
    ema.to(torch.bfloat16).save_pretrained(str(out / "transformer"), safe_serialization=True, max_shard_size="12MB")
    ema.float()
    report = {
        "model": name,
        "steps": step,
        "batch_size": settings.batch_size,
        "train_seconds": round(train_seconds, 1),
        "final_loss": sum(losses[-200:]) / len(losses[-200:]),
        "heldout_loss": heldout_loss,
        "lr": settings.lr,
        "ema_decay": settings.ema_decay,
        "caption_dropout": settings.caption_dropout,
        "precision": settings.precision,
        "compiled": compiled,
        "captions": len(specs),
        "size": settings.side(model),
        "init": _init_summary(settings.init),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "loss_curve": [sum(losses[i : i + 50]) / len(losses[i : i + 50]) for i in range(0, len(losses), 50)],
    }
    (out / "train.json").write_text(json.dumps(report, indent=1))
    _plot_loss(report, out / "loss.png")
    samples = _sample(model, ema, tensors, settings, device)
    _plot_samples(samples, captions["heldout"], out / "samples.png", video)
    (out / "README.md").write_text(model_card(model, report, settings))
    return report


def _initial(model: ReferenceModel, init: Path | None) -> torch.nn.Module:
    if init is None:
        return model.build()
    from cadence.loading import transformer_folder

    return model.transformer_cls.from_pretrained(str(transformer_folder(Path(init))), torch_dtype=torch.float32)


def _init_summary(init: Path | None) -> dict | None:
    """What the starting checkpoint was: its own train.json, less its loss curve."""
    if init is None:
        return None
    path = Path(init) / "train.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    return {"from": str(init), **{k: v for k, v in report.items() if k != "loss_curve"}}


@torch.no_grad()
def _heldout_loss(model, transformer, tensors, captions, device, use_bf16, size: int) -> float:
    """Flow-matching loss on held-out caption combinations (fixed noise): generalisation."""
    specs = [data.parse_caption(c) for c in captions["eval"]]
    generator = torch.Generator(device).manual_seed(0)
    x0 = _batch(model, specs, seed=99, device=device, size=size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        return float(flow_matching_loss(model, transformer, x0, tensors["eval_tokens"], tensors["eval_pooled"], generator))


@torch.no_grad()
def _sample(model, transformer, tensors, settings, device) -> torch.Tensor:
    pipe = model.pipeline_cls(transformer=transformer, scheduler=model.scheduler(), sample_size=model.sample)
    pipe.set_progress_bar_config(disable=True)
    common = dict(steps=settings.sample_steps, guidance_scale=settings.guidance_scale, seed=0)
    if model.task == "video":
        return pipe(prompt_embeds=tensors["heldout_tokens"],
                    negative_prompt_embeds=tensors["empty_tokens"].expand_as(tensors["heldout_tokens"]), **common).frames
    n = tensors["heldout_tokens"].shape[0]
    return pipe(prompt_embeds=tensors["heldout_tokens"], pooled_prompt_embeds=tensors["heldout_pooled"],
                negative_prompt_embeds=tensors["empty_tokens"].expand(n, -1, -1),
                negative_pooled_prompt_embeds=tensors["empty_pooled"].expand(n, -1), **common).images


def _plot_loss(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curve = report["loss_curve"]
    ax.plot([50 * i for i in range(len(curve))], curve)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (mean of 50 steps)")
    ax.set_yscale("log")
    ax.set_title(f"{report['model']}: {report['steps']} steps, final {report['final_loss']:.4f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_samples(samples: torch.Tensor, prompts: list[str], path: Path, video: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [0, 5, 10, 15] if video else [None]
    fig, axes = plt.subplots(len(prompts), len(columns), figsize=(1.6 * len(columns) + 3.2, 1.6 * len(prompts)), squeeze=False)
    for row, prompt in enumerate(prompts):
        for col, frame in enumerate(columns):
            image = samples[row, frame] if video else samples[row]  # (3, H, W)
            ax = axes[row][col]
            ax.imshow(((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0 and video:
                ax.set_title(f"frame {frame}", fontsize=8)
        axes[row][0].set_ylabel(prompt.replace(" over ", "\nover ").replace(" and ", "\nand "), fontsize=7,
                                rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _stage_options(settings: TrainSettings) -> str:
    return (f" --size {settings.size}" if settings.size else "") + (f" --init {settings.init}" if settings.init else "")


def _init_line(report: dict) -> str:
    init = report.get("init")
    if not init:
        return ""
    return (f"- Trained at {report['size']} x {report['size']} pixels, starting from `{init['from']}` "
            f"({init.get('steps', '?')} steps of batch {init.get('batch_size', '?')} at {str(init['size']) + ' pixels' if 'size' in init else 'its own size'}"
            f"{', itself from ' + init['init']['from'] if init.get('init') else ''}).\n")


def model_card(model: ReferenceModel, report: dict, settings: TrainSettings) -> str:
    size = model.sample
    shape = f"{size['frames']} frames x {size['height']} x {size['width']}" if model.task == "video" else f"{size['height']} x {size['width']}"
    return f"""# {model.name}

A diffusers `{model.transformer_cls.__name__}` trained by `cadence train --model {model.name}` for
text-to-{model.task} on cadence's procedural captioned clips. It is a real trained diffusion model
small enough for a CPU, so caching, sparsity and quantization are measured on real trajectories.

## Data
- Generator: `cadence.reference.data` (deterministic from a seed): one or two objects of
  {len(data.SHAPES)} shapes ({", ".join(data.SHAPES)}), {len(data.COLOURS)} colours ({", ".join(data.COLOURS)}),
  {len(data.SIZES)} sizes{", " + str(len(data.MOTIONS)) + " motions (" + ", ".join(data.MOTIONS) + ")" if model.task == "video" else ""};
  backgrounds {", ".join(data.BACKGROUNDS)}.
- Samples: RGB pixels in [-1, 1], {shape}{" (single frames of the clips)" if model.task == "image" else ""}.
- {report['captions']} distinct training captions; held-out caption combinations (`data.is_heldout`) never
  appear in training and are the benchmark's default prompts.
- Text: all-MiniLM-L6-v2 token embeddings (24 x 384){" and its pooled embedding" if model.task == "image" else ""}.

## Model
- `{model.transformer_cls.__name__}({", ".join(f"{k}={v!r}" for k, v in model.config.items())})`
- {report['parameters'] / 1e6:.2f} M parameters, stored in bf16 safetensors.
- Sampling: `FlowMatchEulerDiscreteScheduler(shift={model.shift})`, CFG with the empty caption as negative.

## Training
- Rectified flow, logit-normal timesteps, caption dropout {report['caption_dropout']}, AdamW lr {report['lr']}
  (300-step warm-up, cosine over the time budget), EMA {report['ema_decay']}, {PRECISION_NOTE[report['precision']]}.
- {report['steps']} steps of batch {report['batch_size']} in {report['train_seconds']} s on {report['device']}
  (torch {report['torch']}, {report['date']}).
{_init_line(report)}- Final training loss (mean of the last 200 steps): {report['final_loss']:.4f}; held-out-caption loss:
  {report['heldout_loss']:.4f} (128 held-out clips, fixed noise).

![loss](loss.png)

## Reproduce
On a machine with the text encoder: `cadence train --model {model.name} --prepare-only` (writes
`.carry/embeddings-{model.name}.safetensors`); then on one GPU, with that file beside the code:
`cadence train --model {model.name} --seconds {settings.seconds:g} --batch-size {settings.batch_size} --precision {settings.precision}{"" if settings.compile else " --no-compile"}{_stage_options(settings)}`.

## Samples on held-out prompts
{settings.sample_steps} steps, guidance {settings.guidance_scale}, seed 0.

![samples](samples.png)
"""
