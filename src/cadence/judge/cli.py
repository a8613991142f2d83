"""``cadence judge`` (score clip files against their captions) and ``cadence prompts`` (the
caption grammar); registered in cli.PACKAGE_COMMANDS."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _fail(error: Exception):
    raise click.ClickException(str(error))


@click.command()
def prompts():
    """Print the caption grammar of the reference models' world, the words they know and examples."""
    from cadence.reference import data

    click.echo(data.grammar_text())


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="the caption of every clip (else --prompts, else the file names)")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="a file of 'file-name<TAB>caption' lines, for a folder")
@click.option("--judge", "weights", type=click.Path(path_type=Path), default=None,
              help="judge weights (default: the shipped ones)")
@click.option("--window", type=int, default=16, show_default=True, help="frames per consistency window")
@click.option("--json", "as_json", is_flag=True, help="print the full result as JSON")
def judge(path, prompt, prompts_file, weights, window, as_json):
    """Score a clip file (.gif, .png, .mp4 as cadence writes them) or a folder of them against
    their captions: adherence (share of caption attributes read back, per attribute), FD
    against fresh renders of the same captions (two or more videos) and frame consistency."""
    from cadence.judge import checkpoint, clips, score

    try:
        if prompt is not None and prompts_file is not None:
            raise ValueError("give --prompt or --prompts, not both")
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"--window {window} must be an integer >= 2 frames")
        files = clip_files = clips.clip_files(path)
        captions = clips.captions_for(clip_files, prompt, prompts_file)
        loaded = [clips.read_clip(f) for f in files]
        for file, clip in zip(files, loaded):
            score.check_clip(clip, f"clip {str(file)!r}")
        score.parse_captions(captions, [c.dim() == 4 for c in loaded])  # every caption before the judge loads
        model = checkpoint.load(weights or checkpoint.WEIGHTS)
        result = score.judge_clips(loaded, captions, model)
        videos = [c for c in loaded if c.dim() == 4 and c.shape[0] >= 2]
        if videos:
            per_video = [score.consistency(v, model, window) for v in videos]
            result["consistency"] = sum(r["consistency"] for r in per_video) / len(per_video)
            result["windows"] = [r["windows"] for r in per_video]
    except ValueError as error:
        _fail(error)
    result["files"] = [str(f) for f in files]
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"{len(files)} clip(s); adherence {result['adherence']:.1%}")
    for attribute, share in result["attributes"].items():
        click.echo(f"  {attribute:<18} {share:.1%}")
    if result["fd"] is not None:
        click.echo(f"FD {result['fd']:.2f} (against {len(score.RENDER_SEEDS)} renders per caption)")
    if "consistency" in result:
        click.echo(f"consistency {result['consistency']:.1%} (windows of {window} frames)")
    for file, share in zip(files, result["per_clip"]):
        click.echo(f"  {share:6.1%}  {file.name}")
