# The Wan2.1-1.3B-size bit-reduction set (10 steps with CFG).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
timeout 540 python3 benchmarks/wan_realsize.py --set quant --steps 10 --out $OUT/wan_quant.json > $OUT/wan_quant.log 2>&1
grep -v "Warn\|quantize \|^{" $OUT/wan_quant.log | tail -16
