#!/usr/bin/env bash
# Thirteenth session, device call 2 (issue 14): where the 1k job's fixed time goes (cProfile of the
# whole `congeal align` process), the step's steady state at 256 and 1,024 before (.devold: commit
# a1cb5ab's models) and after channels-last stage inputs and the reshape max-pool, and whether a
# small collection needs 300 epochs (four digits' 1,000-image fits at max_epochs 120 beside the
# defaults, same pairs). Cut to ~300 s after seven failed machine starts; never run (every start
# failed). To run it now: `git archive HEAD models bench/gpu_speed.py bench/baselines_common.py
# congeal | tar -x -C .devold` (the before), then `git apply docs/research/device-calls/session13_nets.patch`
# (the after, reverted from main until measured), carry .devdata and .devold.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --profile --out $OUT/e2e.jsonl > $OUT/e2e_log.txt 2>&1
grep -A45 "function calls" $OUT/e2e_log.txt | head -60
python -c "
import json
for l in open('$OUT/e2e.jsonl'):
    r = json.loads(l); e = r.get('eval', {})
    print('E2E', repr(r.get('options')), r['seconds'], 'rc', r['rc'], 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), 'frame', e.get('frame_size_median'))
    print('  stages', r.get('stage_seconds')); print('  notes', (r.get('notes') or [])[-2:])"
for root in .devold .; do
  timeout 75 python $root/bench/gpu_speed.py --device cuda --parts throughput --batches 256,1024 --configs '[{}]' --out $OUT/speed_$(basename $root).jsonl >> $OUT/speed_log.txt 2>&1
done
for d in 0 4 7 9; do
  timeout 150 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{}, {"max_epochs": 120}]' --out $OUT/sweep.jsonl > $OUT/sweep_log_$d.txt 2>&1 &
done
wait
python -c "
import json
for tag, f in (('before', '.devold'), ('after', '.')):
    for l in open(f'$OUT/speed_{f}.jsonl'):
        r = json.loads(l); print(tag, r['part'], r.get('batch'), r.get('ms_per_step'), r.get('chunk'), r.get('dtype'), r.get('images_per_s'), r.get('step_gflop'), r.get('achieved_tflops'), r.get('error'))
for l in open('$OUT/sweep.jsonl'):
    r = json.loads(l); print('SW', r['digit'], r['cfg'], 'obj', r.get('object_residual_ratio'), 'corner', r.get('residual_ratio'), 'kept', r.get('content_kept'), 's', r.get('seconds'), (r.get('notes') or [])[-1:])
"
