#!/usr/bin/env bash
# Sixteenth session, sixth call. carry .devdata and .devold (`git archive 4933bdf` unpacked: the
# space-to-depth input layer with the convolution's own bias). About 150 s.
# The stage blocks with the bias added after the pool (on a quarter of the values: cuDNN adds a
# bias as a pass of its own, 14 % of the aligner's inference device time in call 1's profile),
# before (.devold) and after on one machine: training steps at 256 / 1,024 and inference; then the
# 1k job.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
for tree in .devold .; do
  (cd $tree && PYTHONPATH=$PWD timeout 70 python bench/gpu_speed.py --parts throughput,inference --batches 256,1024 --configs '[{}]' \
     --out $OUT/speed_$(basename $(realpath $tree)).jsonl >> $OUT/log.txt 2>&1); el "speed $tree"
done
PYTHONPATH=$PWD timeout 30 python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl --sizes 1000 >> $OUT/log.txt 2>&1; el 1k
for f in $OUT/speed_*.jsonl; do echo $f; python -c "
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print({k: r.get(k) for k in ('part','batch','chunk','dtype','ms_per_step','images_per_s','achieved_tflops')})" $f; done
python -c "
import json
for l in open('$OUT/e2e.jsonl'):
    r=json.loads(l); e=r['eval']; print('E2E', r['n_images'], r['seconds'], 'obj', e['object_residual_ratio'], 'kept', e['content_kept'], r['stage_seconds'].get('fit_training'))"
