# Fidelity of every quantization mode on both reference models (8 held-out prompts x 2 seeds).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
E=.carry/heldout-embeddings.safetensors
for m in video image; do
  timeout 450 python3 benchmarks/quant_sweep.py --model ref-$m --embeddings $E --x speedup --out $OUT/quant-$m > $OUT/log-$m.txt 2>&1 &
done
wait
for m in video image; do grep -v "Warn\|warn" $OUT/log-$m.txt | grep "^| \|Error" | head -30; done
