# Call 3: both reference-model sweeps, 4 parts each, in parallel.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
E=.carry/heldout-embeddings.safetensors
for m in video image; do for p in 1 2 3 4; do
  CADENCE_CACHE=/tmp/cache-$m-$p timeout 420 python3 benchmarks/sparse_sweep.py --model ref-$m --embeddings $E --part $p/4 --out /tmp/sparse-$m-$p > /tmp/log-$m-$p.txt 2>&1 &
done; done
wait
for m in video image; do
  python3 benchmarks/sparse_sweep.py --model ref-$m --merge /tmp/sparse-$m-[1-4] --out /tmp/sparse-$m > /tmp/merge-$m.txt 2>&1
  cp /tmp/sparse-$m/frontier.png $OUT/frontier-$m.png; cp /tmp/sparse-$m/frontier.md $OUT/frontier-$m.md
  grep -h "failed" /tmp/log-$m-*.txt | tail
  for p in 1 2 3 4; do tail -c 150 /tmp/log-$m-$p.txt; echo; done
done
cd /tmp && tar czf $OUT/sparse-sweeps.tgz sparse-* log-* merge-*
