#!/usr/bin/env bash
# Twelfth session, device call 2: call 1 cut to what ~500 s of device time can hold after the
# failed machine starts. Does the GPU trainer with the CPU's networks (the small auto-encoder,
# Table 1's DeSTNet width) train faster and keep quality, and does it stop the 1k job's crop?
# Throughput of both at 1,024, the 1k job with the narrow one, five digits at sigma 10 % with each.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
S=$OUT/speed.jsonl
timeout 60 python bench/gpu_speed.py --parts throughput --batches 1024 --configs '[{}]' --out $S > $OUT/speed_log.txt 2>&1
timeout 50 python bench/gpu_speed.py --parts throughput --batches 1024 --configs '[{"preset": "small", "width": 1}]' --out $S >> $OUT/speed_log.txt 2>&1
python -c "
import json
for l in open('$S'):
    r = json.loads(l); print('THR', r.get('config'), r.get('batch'), r.get('ms_per_step'), r.get('images_per_s'), r.get('step_gflop'), r.get('achieved_tflops'), r.get('graph'), r.get('error'))"
for o in "--option preset=small --option width=1"; do
  timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "$o" --out $OUT/e2e.jsonl >> $OUT/e2e_log.txt 2>&1
  python -c "
import json; r = [json.loads(l) for l in open('$OUT/e2e.jsonl')][-1]; e = r.get('eval', {})
print('E2E', r.get('options'), r['seconds'], 'rc', r['rc'], 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), 'frame', e.get('frame_size_median'), r.get('stage_seconds'), (r.get('notes') or [])[-2:])" 2>&1 | tail -1
done
for d in 0 1 4 7 9; do
  timeout 110 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{"preset": "small", "width": 1}, {}]' --out $OUT/sweep_$d.jsonl > $OUT/sweep_log_$d.txt 2>&1 &
done
wait
cat $OUT/sweep_*.jsonl | python -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); print('SW', r['digit'], r['cfg'], 'obj', r.get('object_residual_ratio'), 'corner', r.get('residual_ratio'), 'kept', r.get('content_kept'), 's', r.get('seconds'), (r.get('notes') or [])[-1:])"
