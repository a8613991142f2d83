"""The judge: small models trained on the procedural world (reference/data.py), whose labels
are exact, that read a generated clip back into its caption's attributes.

    from cadence.judge import adherence, consistency, fd, judge_clips
    result = judge_clips(videos, captions)   # {"adherence", "attributes", "per_clip", "fd", "clips"}
    consistency(long_video)["windows"]       # per window of frames: does object identity hold?

model.py is the network (pair queries over 3D-conv features), labels.py the targets,
readback.py which attributes a reading reads back, score.py the metrics, checkpoint.py the
committed weights (weights/README.md is their card), train.py the trainer, clips.py and
cli.py the `cadence judge` and `cadence prompts` commands.
"""

from cadence.judge.score import adherence, consistency, fd, judge_clips

__all__ = ["adherence", "consistency", "fd", "judge_clips"]
