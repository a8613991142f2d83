"""Make the wheels the dLLM benchmarks need on the GPU machine, within the 64 MiB carry limit.

The GPU machine has no transformers. The full transformers 5.24.0 wheel is 13.5 MB (60 MB
installed, 51 MB of it model folders), more than the carry limit leaves; cadence's dLLM code
needs only transformers' core and the ``eurobert`` model (LLaDA's architecture), plus the
three model folders diffusers 0.42.1 imports when ``LLaDA2Pipeline`` loads (dinov2_with_registers,
siglip, vit_mae; found by importing until nothing is missing). This rewrites a downloaded
transformers wheel without the other model folders (2.4 MB). Run here, on the CPU:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d /tmp/dllm-whl \\
      transformers==5.24.0 tokenizers==0.23.3 regex==2026.1.15
    python3 benchmarks/dllm_slim_transformers.py /tmp/dllm-whl/transformers-5.24.0-py3-none-any.whl .whl/
    cp /tmp/dllm-whl/tokenizers-*.whl /tmp/dllm-whl/regex-*.whl .whl/
"""

import sys
import zipfile
from pathlib import Path

KEEP = {"auto", "eurobert", "llama", "dinov2_with_registers", "siglip", "vit_mae"}


def slim(wheel: Path, out_dir: Path) -> Path:
    out = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            parts = item.filename.split("/")
            if len(parts) > 3 and parts[:2] == ["transformers", "models"] and parts[2] not in KEEP:
                continue
            target.writestr(item, source.read(item))
    return out


if __name__ == "__main__":
    made = slim(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{made}: {made.stat().st_size / 1e6:.1f} MB")
