"""Train the judge on freshly rendered clips and images, within a time budget:

    python -m cadence.judge.train --out src/cadence/judge/weights/judge.safetensors --minutes 18
    python -m cadence.judge.train --device cuda --minutes 10 --batch 128 --out judge.safetensors

Every batch is new renders (data.render / data.render_images, a new nuisance seed per
step), so the judge never sees the same clip twice and the evaluation renders (their own
seeds, never used in training) are held out. The judge is trained on captions of both
splits: it must read every caption, including the combinations the generators never saw;
its accuracy is reported separately on held-out-split captions. The learning rate follows
a cosine over the time budget, so a run ends annealed whenever its budget ends.

Writes the weights and, beside them, ``judge-train.json`` (arguments, history, the
per-attribute accuracy table on held-out renders).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cadence.judge import checkpoint, labels
from cadence.judge.model import FRAMES, SIZE, Judge, Reading
from cadence.judge.readback import read_back, tally
from cadence.reference import data

_EVAL_SEED = 10**9  # render seeds of the evaluation sets; training uses seeds 0, 1, 2, ...
_TWO_OBJECTS = 0.5  # more two-object clips than the benchmark's 0.3: they are the hard case
_HELDOUT_SHARE = 0.25  # of each training batch, drawn from the held-out split
_PRESENT_WEIGHT = torch.tensor(8.0)  # positive pairs count 8x in the presence loss
_NOISE = 0.05  # at most this much Gaussian noise on half the clips: generated clips are not clean


def _loss(reading: Reading, target: labels.Targets) -> torch.Tensor:
    # 1 or 2 of the 48 pairs are present: weighting presence up keeps "nothing is there" from
    # being the cheap early answer.
    weight = _PRESENT_WEIGHT.to(reading.presence.device)
    loss = F.binary_cross_entropy_with_logits(reading.presence, target.presence, pos_weight=weight) * 4
    loss = loss + F.cross_entropy(reading.size.flatten(0, 1), target.size.flatten(), ignore_index=labels.IGNORE)
    if reading.motion is not None:
        loss = loss + F.cross_entropy(reading.motion.flatten(0, 1), target.motion.flatten(), ignore_index=labels.IGNORE)
    for name in ("count", "background", "background_colour"):
        loss = loss + F.cross_entropy(getattr(reading, name), getattr(target, name))
    return loss


def _specs(batch: int, seed: int, video: bool) -> list[data.ClipSpec]:
    heldout = max(1, round(batch * _HELDOUT_SHARE))
    return (data.sample_specs(batch - heldout, seed, "train", video, _TWO_OBJECTS)
            + data.sample_specs(heldout, seed, "heldout", video, _TWO_OBJECTS))


def _noisy(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = torch.rand(x.shape[0], generator=generator) * _NOISE * (torch.rand(x.shape[0], generator=generator) < 0.5)
    sigma = sigma.to(x.device).reshape(-1, *[1] * (x.dim() - 1))
    return (x + sigma * torch.randn_like(x)).clamp(-1, 1)  # on x's device: the GPU run is not held up by the CPU


def train_step(judge: Judge, step: int, batch: int, device, generator: torch.Generator) -> torch.Tensor:
    clip_specs = _specs(batch, step, video=True)
    image_specs = _specs(batch, step, video=False)
    clips = _noisy(data.render(clip_specs, FRAMES, SIZE, seed=step, device=device), generator)
    images = _noisy(data.render_images(image_specs, SIZE, seed=step, device=device), generator)

    frame_features = judge.frame_features(clips)  # (B, 64, T, 8, 8)
    clip_reading, _ = judge.read_clip(judge.motion_features(frame_features))
    picked = torch.randint(0, FRAMES, (2,), generator=generator).to(device)  # two frames per clip teach the frame reader
    frame_reading = judge.read_frames(frame_features.index_select(2, picked))
    image_reading = judge.read_frames(judge.frame_features(images[:, :, None]))
    return (_loss(clip_reading, labels.targets(clip_specs, device=device))
            + _loss(frame_reading, labels.targets(clip_specs, frame_level=True, device=device).repeat_frames(2))
            + _loss(image_reading, labels.targets(image_specs, device=device)))


def evaluation_sets(count: int) -> dict[str, tuple[list[data.ClipSpec], bool]]:
    """Held-out renders: captions of each split at the benchmark's share of two-object clips."""
    return {
        "video, held-out captions": (data.sample_specs(count, _EVAL_SEED, "heldout", True), True),
        "video, training captions": (data.sample_specs(count, _EVAL_SEED, "train", True), True),
        "image, held-out captions": (data.sample_specs(count, _EVAL_SEED, "heldout", False), False),
    }


@torch.no_grad()
def accuracy(judge: Judge, specs: list[data.ClipSpec], video: bool, device, chunk: int = 64) -> dict[str, float]:
    """Per-attribute share the judge reads back from fresh renders of ``specs`` (seed _EVAL_SEED)."""
    judge.eval()
    found = []
    for start in range(0, len(specs), chunk):
        part = specs[start:start + chunk]
        if video:
            reading, _ = judge.read_clip(judge.motion_features(judge.frame_features(
                data.render(part, FRAMES, SIZE, seed=_EVAL_SEED + start, device=device))))
        else:
            images = data.render_images(part, SIZE, seed=_EVAL_SEED + start, device=device)
            reading = judge.read_frames(judge.frame_features(images[:, :, None]))
        found += read_back(reading, part, video)
    return tally(found)


def _table(results: dict[str, dict[str, float]]) -> str:
    attributes = list(next(iter(results.values())))
    lines = ["| set | " + " | ".join(attributes) + " |", "|---|" + "---:|" * len(attributes)]
    for name, shares in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * shares[a]:.1f}" if a in shares else "-" for a in attributes) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=checkpoint.WEIGHTS)
    parser.add_argument("--minutes", type=float, default=18.0, help="training time budget (evaluation not counted)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (a longer second run)")
    parser.add_argument("--eval-count", type=int, default=512, help="clips per evaluation set")
    parser.add_argument("--seed", type=int, default=0, help="first render seed (and the weight init seed)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.batch < 2:
        parser.error(f"--minutes {args.minutes} must be > 0 and --batch {args.batch} >= 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    judge = checkpoint.load(args.init, args.device) if args.init else Judge().to(args.device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    budget, begin, step, history = args.minutes * 60, time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - begin) < budget:
        judge.train()
        warm = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        loss = train_step(judge, args.seed * 1_000_000 + step, args.batch, args.device, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4)})
            print(json.dumps(history[-1]), flush=True)
        step += 1
    trained_seconds = time.perf_counter() - begin
    results = {name: accuracy(judge, specs, video, args.device) for name, (specs, video)
               in evaluation_sets(args.eval_count).items()}
    table = _table(results)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    record = {"arguments": {k: str(v) for k, v in vars(args).items()}, "steps": step, "clips_seen": step * args.batch,
              "train_seconds": round(trained_seconds, 1), "device": device, "torch": torch.__version__,
              "accuracy": results, "history": history}
    checkpoint.save(judge, args.out, {"steps": step, "accuracy": results})
    (args.out.parent / "judge-train.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({step} steps, {trained_seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
