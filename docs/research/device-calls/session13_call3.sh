#!/usr/bin/env bash
# Thirteenth session, device call 3 (issue 14): call 2 cut to what ~450 s of device time can hold
# after nine failed machine starts. The step's steady state at 256 and 1,024 before (.devold:
# commit a1cb5ab's models) and after channels-last stage inputs and the reshape max-pool; then
# whether a small collection needs 300 epochs (two digits' 1,000-image fits at max_epochs 120
# beside the defaults, same pairs; the two processes share the card).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for root in .devold .; do
  timeout 60 python $root/bench/gpu_speed.py --device cuda --parts throughput --batches 256,1024 --configs '[{}]' --out $OUT/speed_$(basename $root).jsonl >> $OUT/speed_log.txt 2>&1
done
python -c "
import json
for tag, f in (('before', '.devold'), ('after', '.')):
    for l in open(f'$OUT/speed_{f}.jsonl'):
        r = json.loads(l); print(tag, r['part'], r.get('batch'), r.get('ms_per_step'), r.get('images_per_s'), r.get('step_gflop'), r.get('achieved_tflops'), r.get('fit_seconds'), r.get('error'))"
for d in 0 7; do
  timeout 120 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{}, {"max_epochs": 120}]' --out $OUT/sweep.jsonl > $OUT/sweep_log_$d.txt 2>&1 &
done
wait
python -c "
import json
for l in open('$OUT/sweep.jsonl'):
    r = json.loads(l); print('SW', r['digit'], r['cfg'], 'obj', r.get('object_residual_ratio'), 'corner', r.get('residual_ratio'), 'kept', r.get('content_kept'), 's', r.get('seconds'), (r.get('notes') or [])[-1:])
"
