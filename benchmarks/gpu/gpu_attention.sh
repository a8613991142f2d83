# Call 1: kernels at real size, then the 3D window end to end at densities 0.5 / 0.25 / 0.1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv
timeout 200 python3 benchmarks/attention_kernels.py --no-flex-variants --out $OUT/attention_kernels.json > $OUT/kernels.log 2>&1
tail -30 $OUT/kernels.log
timeout 380 python3 benchmarks/wan_realsize.py --set sparse --out $OUT/wan_sparse.json > $OUT/wan_sparse.log 2>&1
tail -12 $OUT/wan_sparse.log
