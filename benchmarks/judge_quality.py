"""A reference model's own quality as the judge sees it, and how the judge's metrics move
as its samples are degraded on purpose (fewer steps, added noise, blur, the wrong prompt).

    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-video --steps 50 8 2 --prompts 16 --out q.json
    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-image --steps 50 --prompts 32 --out qi.json
    PYTHONPATH=src python benchmarks/judge_quality.py --model ref-video-4step --steps 4 --prompts 64 --no-degradations --out s.json

A model runs at its own guidance (``generation.sampling``): 4.0, or a distilled student's 1.0.

The prompts are the held-out captions (data.heldout_prompts). Generations are cached in
``--cache`` (a safetensors file per model, steps, prompt and seed set), so a second run only
judges. For each step count: adherence (pooled and per attribute), FD against renders of
the same captions (videos), frame consistency (videos); for the first step count also the
degradations: Gaussian noise (sigma 0.1, 0.3), a 3x3 / 5x5 box blur, and every clip judged
against the next prompt's caption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import cadence
from cadence import generation
from cadence.judge import checkpoint, score
from cadence.loading import STUDENT_FILE
from cadence.reference import data
from cadence.reference.models import STUDENTS, reference_model


def generate_all(model: str, prompts: list[str], seeds: list[int], steps: int, device: str, cache: Path,
                 embeddings: Path | None) -> list[torch.Tensor]:
    key = hashlib.sha256(json.dumps([model, prompts, seeds, steps]).encode()).hexdigest()[:16]
    path = cache / f"{model}-{steps}steps-{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return [stored[str(i)] for i in range(len(stored))]
    pipe = cadence.load(model, device=device, text_encoder=embeddings is None)
    if embeddings is not None:
        from cadence.reference.text import load_prompt_embeddings

        pipe.prompt_cache = load_prompt_embeddings(embeddings)
    pipe.set_progress_bar_config(disable=True)
    size = generation.resolve_size(pipe)
    _, guidance = generation.sampling(pipe, steps)
    outputs = []
    for prompt in prompts:
        for seed in seeds:
            outputs.append(generation.generate(pipe, prompt, steps=steps, seed=seed, guidance_scale=guidance,
                                               size=size).cpu())
    cache.mkdir(parents=True, exist_ok=True)
    save_file({str(i): o.contiguous() for i, o in enumerate(outputs)}, str(path))
    return outputs


def blur(clip: torch.Tensor, width: int) -> torch.Tensor:
    """Box blur of every frame, ``width`` x ``width`` (replicate padding)."""
    frames = clip if clip.dim() == 4 else clip[None]
    padded = F.pad(frames, [width // 2] * 4, mode="replicate")
    kernel = torch.full((3, 1, width, width), 1.0 / width**2)
    out = F.conv2d(padded, kernel, groups=3)
    return out if clip.dim() == 4 else out[0]


def noisy(clip: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (clip + sigma * torch.randn(clip.shape, generator=generator)).clamp(-1, 1)


def measure(judge, clips: list[torch.Tensor], captions: list[str]) -> dict:
    result = score.judge_clips(clips, captions, judge)
    result.pop("per_clip")
    if clips[0].dim() == 4:
        result["consistency"] = sum(score.consistency(c, judge)["consistency"] for c in clips) / len(clips)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ref-video")
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--judge", type=Path, default=checkpoint.WEIGHTS)
    parser.add_argument("--embeddings", type=Path, default=None, help="precomputed prompt embeddings (no text encoder)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cadence-judge-quality"))
    parser.add_argument("--no-degradations", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    teacher = json.loads((STUDENTS[args.model] / STUDENT_FILE).read_text())["teacher"] \
        if args.model in STUDENTS else args.model
    video = reference_model(teacher).task == "video"
    prompts = data.heldout_prompts(args.prompts, video=video)
    seeds = list(range(args.seeds))
    captions = [p for p in prompts for _ in seeds]
    judge = checkpoint.load(args.judge)
    results = {"model": args.model, "prompts": len(prompts), "seeds": args.seeds, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
               "date": time.strftime("%Y-%m-%d"), "rows": []}
    for index, steps in enumerate(args.steps):
        begin = time.perf_counter()
        clips = generate_all(args.model, prompts, seeds, steps, args.device, args.cache, args.embeddings)
        generated = time.perf_counter() - begin
        rows = [(f"{steps} steps", clips, captions)]
        if index == 0 and not args.no_degradations:
            wrong = captions[1:] + captions[:1]
            rows += [
                (f"{steps} steps + noise 0.1", [noisy(c, 0.1, i) for i, c in enumerate(clips)], captions),
                (f"{steps} steps + noise 0.3", [noisy(c, 0.3, i) for i, c in enumerate(clips)], captions),
                (f"{steps} steps + blur 3", [blur(c, 3) for c in clips], captions),
                (f"{steps} steps + blur 5", [blur(c, 5) for c in clips], captions),
                (f"{steps} steps, wrong prompt", clips, wrong),
            ]
        for name, row_clips, row_captions in rows:
            row = {"name": name, **measure(judge, row_clips, row_captions), "generate_seconds": round(generated, 1)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    rendered = score.rendered_like(clips, [data.parse_caption(c) for c in captions], seeds=(7,)) if video else \
        [data.render_images([data.parse_caption(c)], seed=7 + i)[0] for i, c in enumerate(captions)]
    results["rows"].append({"name": "renders of the captions", **measure(judge, rendered, captions)})
    print(json.dumps(results["rows"][-1]), flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
