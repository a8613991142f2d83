# Fidelity of the composed recipes and diffusers' hooks on ref-video at 50 steps, then the
# composed recipes the first call did not reach at the Wan2.1-1.3B size.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 260 python3 benchmarks/compose_sweep.py --model ref-video --steps 50 --prompts 4 --seeds 2 \
  --embeddings .carry/heldout-embeddings.safetensors --x speedup --out $OUT/compose-video > $OUT/log-sweep.txt 2>&1
grep "^| " $OUT/log-sweep.txt | head -40; grep -i "error\|failed" $OUT/log-sweep.txt | head
S="attention-backend(backend='sage')"
timeout 280 python3 benchmarks/wan_realsize.py --calibration-steps 10 --recipes baseline \
  "magcache(budget=0.2, calibration='{magcache}') + compile + $S" \
  "magcache(budget=0.25, calibration='{magcache}') + compile + fp8 + $S" \
  --out $OUT/wan_composed2.json 2>&1 | grep -v "Warn\|warn" | tail -8
