# Wan2.1-1.3B size, 50 steps with CFG: compile and the composed recipes against diffusers' MagCache.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 570 python3 benchmarks/wan_realsize.py --set composed --calibration-steps 10 \
  --out $OUT/wan_composed.json 2>&1 | grep -v "Warn\|warn" | tail -40
cp $OUT/wan_composed.json.partial $OUT/partial.json 2>/dev/null; true
