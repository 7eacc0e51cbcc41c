python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONPYCACHEPREFIX=/tmp/pyc TRITON_CACHE_DIR=/tmp/tcache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for c in off on; do
  /usr/bin/time -f "round cc_$c: %e s" timeout 270 python3 -m orchestrator.cli round --spec scratch/cc_$c.yaml > $OUT/cc_$c.log 2>&1
  tail -1 $OUT/cc_$c.log
  python3 -c "
import json
for l in open('results/cc_$c/records.jsonl'):
    r = json.loads(l); res = r.get('result', r)
    print(r['candidate'], res.get('status'), 'wall', round(res.get('wall_s', 0), 1), 'tok/s', round(res.get('tokens_per_s', 0)), 'compiled', res.get('compiled'), 'mb', res.get('micro_batch'), 'peak', res.get('peak_mem_bytes'), 'val', res.get('final', {}).get('val_hole_acc'))
" 2>&1 | tail -6
done
tar czf $OUT/cc.tgz results/cc_off results/cc_on
