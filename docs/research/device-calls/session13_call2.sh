#!/usr/bin/env bash
# Thirteenth session, device call 2 (issue 14): where the 1k job's fixed time goes (cProfile of the
# whole `congeal align` process), whether a small collection needs 300 epochs (the 1k job and four
# digits' 1,000-image fits at max_epochs 120 beside the defaults, same pairs), the step's steady
# state at 256 and 1,024 before (.devold: HEAD a1cb5ab's models) and after channels-last stage
# inputs and the reshape max-pool, and the DeSTNet's convolutions alone by implementation.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --profile --out $OUT/e2e.jsonl > $OUT/e2e_log.txt 2>&1
grep -A45 "function calls" $OUT/e2e_log.txt | head -60
timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option max_epochs=120" --out $OUT/e2e.jsonl >> $OUT/e2e_log.txt 2>&1
python -c "
import json
for l in open('$OUT/e2e.jsonl'):
    r = json.loads(l); e = r.get('eval', {})
    print('E2E', repr(r.get('options')), r['seconds'], 'rc', r['rc'], 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), 'frame', e.get('frame_size_median'))
    print('  stages', r.get('stage_seconds')); print('  notes', (r.get('notes') or [])[-2:])"
for root in .devold .; do
  timeout 70 python $root/bench/gpu_speed.py --device cuda --parts throughput --batches 256,1024 --configs '[{}]' --out $OUT/speed.jsonl >> $OUT/speed_log.txt 2>&1
done
timeout 60 python bench/conv_shapes.py --device cuda --batches 1024,4096 --out $OUT/conv.jsonl > $OUT/conv_log.txt 2>&1
for d in 0 4 7 9; do
  timeout 170 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{}, {"max_epochs": 120}]' --out $OUT/sweep.jsonl > $OUT/sweep_log_$d.txt 2>&1 &
done
wait
python -c "
import json
for i, l in enumerate(open('$OUT/speed.jsonl')):
    r = json.loads(l); print('THR', 'before' if i < 2 else 'after', r.get('config'), r.get('batch'), r.get('ms_per_step'), r.get('images_per_s'), r.get('step_gflop'), r.get('achieved_tflops'), r.get('graph'), r.get('error'))
for l in open('$OUT/sweep.jsonl'):
    r = json.loads(l); print('SW', r['digit'], r['cfg'], 'obj', r.get('object_residual_ratio'), 'corner', r.get('residual_ratio'), 'kept', r.get('content_kept'), 's', r.get('seconds'), (r.get('notes') or [])[-1:])
"
cat $OUT/conv_log.txt | tail -30
