# The other families at their real sizes through their own diffusers pipelines: compile and
# composed recipes (steps per family chosen to fit one call; ratios per step).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
run() {  # family steps seconds
  timeout $3 python3 benchmarks/families_realsize.py --family $1 --steps $2 --out $OUT/$1.json > $OUT/log-$1.txt 2>&1
  grep -v "Warn\|warn\|^{" $OUT/log-$1.txt | grep -v "^ *$" | tail -7
}
run flux-dev 50 90
run cogvideox-2b 20 110
run hunyuan-video 10 130
run wan-14b 10 180
