#!/usr/bin/env bash
# Eleventh session, device call 3 (call 2 never started: four failed machine starts; ~250 s of
# device time were left). The 1k job without the re-fit as is, with the CPU's small auto-encoder
# and at width 1 (which GPU-only ingredient crops?), then the pairwise benchmark on the GPU beside
# kornia (issue 17; kornia travels as wheels copied to devwhl/ for this call).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site devwhl/*.whl
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
for o in "" "--option preset=small" "--option width=1"; do
  timeout 48 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option reframe=0 $o" --out $OUT/zoom.jsonl >> $OUT/log.txt 2>&1
  python -c "
import json; r = [json.loads(l) for l in open('$OUT/zoom.jsonl')][-1]; e = r.get('eval', {})
print('E2E', r.get('options'), r['seconds'], 'rc', r['rc'], 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), 'frame', e.get('frame_size_median'), r.get('stage_seconds', {}).get('fit_training'), (r.get('notes') or [])[-1:])" 2>&1 | tail -1
done
timeout 100 python bench/pairwise.py --pairs 32 --methods learned,ecc,kornia --limit kornia=8 --device cuda --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1
tail -n 14 $OUT/pairwise_log.txt
