"""Run ``cadence distill`` through benchmarks/gpu/run.sh on the GPU.

run.sh runs ``python3 benchmarks/SCRIPT.py ARGS``; the console script ``cadence`` is not
installed there, so this forwards its arguments to the same click command. Give --out a folder
outside $OUT and pack it yourself without its resumable state (the student, the critic and both
optimizers in float32: far over the 16 MB a returned file may hold), e.g.
    bash benchmarks/gpu/run.sh --timeout 560 distill_cli.py --teacher ref-video --steps 4 --device cuda \\
        --seconds 480 --embeddings .carry/distill-embeddings-ref-video.safetensors --out /tmp/students/ref-video-4; \\
    tar czf $OUT/ref-video-4.tgz --exclude state -C /tmp/students ref-video-4
"""

from cadence.distill.cli import distill

if __name__ == "__main__":
    distill(prog_name="cadence distill")
