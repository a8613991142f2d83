set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
nvidia-smi --query-gpu=name --format=csv
timeout 150 python3 benchmarks/quant_linears.py --out $OUT/quant_linears.json 2>&1 | grep -v Warn | tail -12
timeout 330 python3 benchmarks/flux_realsize.py --out $OUT/flux_realsize.json 2>&1 | grep -v Warn | tail -14
