"""The judge's quality metrics in the benchmark: ``adherence`` per output and ``fd`` per
recipe (the baseline included, so a reader sees the model's own quality beside what a
recipe changed).

Only for a reference model whose prompts are all captions of its world (data.parse_caption
in the model's form): a real checkpoint's prompts are not, and its rows carry no judge keys.
"""

from __future__ import annotations

from cadence.reference import data
from cadence.reference.models import REFERENCE_MODELS, reference_model


def judged(model: str, prompts: list[str]) -> bool:
    """Whether the judge can score this run: a reference model, every prompt in its grammar."""
    if model not in REFERENCE_MODELS:
        return False
    video = reference_model(model).task == "video"
    try:
        for prompt in prompts:
            data.parse_caption(prompt, video=video)
    except ValueError:
        return False
    return True


def check_judge() -> None:
    """Refuse a damaged judge checkpoint (ValueError naming it) before the reference model loads."""
    from cadence.judge import checkpoint

    checkpoint.check()


def judge_outputs(outputs: dict[str, list], device: str = "cpu") -> dict[str, dict]:
    """{recipe: [(prompt, output), ...]} -> {recipe: {"per_output": [row keys], "fd": float | None}}.

    Row keys of each output, in its order: ``adherence`` (share of its caption's attributes
    read back) and ``adherence_counts`` ({attribute: [read back, of]}, what summaries pool).
    """
    from cadence.judge import checkpoint, score

    judge = checkpoint.load(device=device)
    results = {}
    for recipe, pairs in outputs.items():
        prompts = [prompt for prompt, _ in pairs]
        clips = [output.detach().cpu().float() for _, output in pairs]
        read = score.read(clips, prompts, judge)
        per_output = [{"adherence": sum(sum(v) for v in found.values()) / sum(len(v) for v in found.values()),
                       "adherence_counts": {a: [sum(v), len(v)] for a, v in found.items()}} for found in read.found]
        results[recipe] = {"per_output": per_output,
                           "fd": score.fd_against_renders(clips, prompts, read.features, judge)}
    return results
