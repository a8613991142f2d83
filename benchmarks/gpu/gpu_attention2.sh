# Call 2: the other patterns end to end at density 0.1, then the ref-video sweep (4 parts).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv
timeout 330 python3 benchmarks/wan_realsize.py --set patterns --out $OUT/wan_patterns.json > $OUT/wan_patterns.log 2>&1
tail -10 $OUT/wan_patterns.log
m=${1:-video}; E=.carry/heldout-embeddings.safetensors; parts=""
for p in 1 2 3 4; do
  CADENCE_CACHE=/tmp/cache-$m-$p timeout ${2:-240} python3 benchmarks/sparse_sweep.py --model ref-$m --embeddings $E --part $p/4 --out /tmp/sparse-$m-$p > /tmp/log-$m-$p.txt 2>&1 &
  parts="$parts /tmp/sparse-$m-$p"
done
wait
python3 benchmarks/sparse_sweep.py --model ref-$m --merge $parts --out /tmp/sparse-$m > /tmp/merge-$m.txt 2>&1
cp /tmp/sparse-$m/frontier.png $OUT/frontier-$m.png; cp /tmp/sparse-$m/frontier.md $OUT/frontier-$m.md
grep -h "failed" /tmp/log-$m-*.txt | tail; for p in 1 2 3 4; do tail -c 200 /tmp/log-$m-$p.txt; echo; done
cd /tmp && tar czf $OUT/sparse-$m.tgz sparse-$m* log-$m-* merge-$m.txt
