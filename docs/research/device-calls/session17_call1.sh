#!/usr/bin/env bash
# Written in the sixteenth session, for the next. carry .devdata and .devold (`git archive a6bda8d`
# unpacked: the space-to-depth block as measured in session 16, its kernel by pad/slices/stack and
# the phase maximum by amax). About 330 s.
# (1) The block with fewer operations (b30080d: one gather, a (4, 1) max-pool; 1,517 -> 1,389
#     operations a step on the CPU count) against a6bda8d on one machine: training steps at 256 /
#     1,024 and inference.
# (2) The 1k / 6k / 1M jobs on the current code (the 1M and 6k rows of session 16 predate the bias
#     after the pool), the 1k twice (a fresh machine's first job pays cold caches).
# (3) The 1k <= 15 s target without fewer epochs: the 1k job at a batch of 512 (300 epochs = 586
#     steps of ~18 ms) and 1,024 (added in session 17); the other digits at 512 are session17_call2.sh's.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
for tree in .devold .; do
  (cd $tree && PYTHONPATH=$PWD timeout 70 python bench/gpu_speed.py --parts throughput,inference --batches 256,1024 --configs '[{}]' \
     --out $OUT/speed_$(basename $(realpath $tree)).jsonl >> $OUT/log.txt 2>&1); el "speed $tree"
done
export PYTHONPATH=$PWD
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
for i in 1 2; do timeout 30 $E --sizes 1000 >> $OUT/log.txt 2>&1; done; el 1k
timeout 30 $E --sizes 1000 --options "--option batch_size=512" >> $OUT/log.txt 2>&1; el 1k512
timeout 30 $E --sizes 1000 --options "--option batch_size=1024" >> $OUT/log.txt 2>&1; el 1k1024
timeout 45 $E --sizes 6000 --gen-device cuda >> $OUT/log.txt 2>&1; el 6k
timeout 120 $E --sizes 1000000 --gen-device cuda >> $OUT/log.txt 2>&1; el 1m
for f in $OUT/speed_*.jsonl; do echo $f; python -c "
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print({k: r.get(k) for k in ('part','batch','chunk','dtype','ms_per_step','images_per_s','achieved_tflops')})" $f; done
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), r.get("stage_seconds"))
PY
