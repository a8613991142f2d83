"""Pack a trained student for shipping beside the reference models:

    python -m cadence.distill.pack STUDENT_DIR OUT_DIR

copies the student's folder without its resumable ``state/`` and writes its transformer's bf16
weights as one ``.safetensors.delta.xz``: their difference from the teacher's
(:func:`cadence.loading.pack_delta`), which ``cadence.load`` adds back bit for bit. The teacher
is the one ``student.json`` names, and must be a reference model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from cadence.loading import DELTA, pack_delta
from cadence.reference.models import REFERENCE_MODELS

WEIGHTS = "diffusion_pytorch_model.safetensors"


def pack(student: Path, out: Path) -> Path:
    student, out = Path(student), Path(out)
    record = json.loads((student / "student.json").read_text())
    teacher = record.get("teacher")
    if teacher not in REFERENCE_MODELS:
        raise ValueError(f"{student / 'student.json'}: teacher {teacher!r}; a packed student needs a reference "
                         f"teacher, one of {', '.join(REFERENCE_MODELS)}")
    if out.exists():
        raise ValueError(f"{out} exists; pack into a new folder")
    shutil.copytree(student, out, ignore=shutil.ignore_patterns("state", "*.safetensors", "*.safetensors.index.json"))
    try:
        pack_delta(student / "transformer", out / "transformer" / f"{WEIGHTS}{DELTA}", teacher)
    except BaseException:  # a refused pack leaves no half-written folder behind
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(pack(Path(sys.argv[1]), Path(sys.argv[2])))
