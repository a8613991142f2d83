"""Train the judge on the GPU through benchmarks/gpu/run.sh (the trainer itself is
``python -m cadence.judge.train``; this file only lets run.sh find it):

    bash benchmarks/gpu/run.sh --timeout 560 train_judge.py --device cuda --minutes 8 --batch 256 \
        --threads 8 --out $OUT/judge.safetensors

writes $OUT/judge.safetensors and $OUT/judge-train.json (the accuracy table for the card).
"""

from cadence.judge.train import main

if __name__ == "__main__":
    main()
