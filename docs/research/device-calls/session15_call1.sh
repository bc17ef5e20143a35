#!/usr/bin/env bash
# Written in the fourteenth session, run in the fifteenth (results bench/results/session15/); carry .devdata and .whl
# (kornia 0.9.0 + kornia_rs 0.2.0 wheels: `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ... -d .whl`).
# (1) The new defaults (GPU batch 256 at every size; equivariance in frame units from 4,096 images)
#     as a user runs them: the 1M job with no options, and 6k jobs on four more digits and at
#     sigma = 20 % against input units (only digit 3 at sigma = 10 % was measured).
# (2) A small collection's epochs for the 1k <= 15 s target: the 1k job at max_epochs=100, and four
#     digits' 1,000-image fits at 100 (120 and 300 are in bench/results/session14/sweep_call1_max_epochs.txt).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
timeout 120 $E --sizes 1000000 --gen-device cuda >> $OUT/log.txt 2>&1; el 1m
timeout 40 $E --sizes 1000 --options "--option max_epochs=100" >> $OUT/log.txt 2>&1; el 1k100
# where the 1k job's start-up and set-up go (cProfile of the whole CLI; import times)
timeout 45 python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e_prof.jsonl --sizes 1000 --profile > $OUT/profile1k.txt 2>&1; el prof
python -X importtime -c "import models.pipeline" 2> $OUT/importtime.txt; sort -t"|" -k2 -n $OUT/importtime.txt | tail -15
for d in 0 4 7 9; do timeout 60 $E --sizes 6000 --gen-device cuda --digit $d >> $OUT/log.txt 2>&1; done; el 6k_digits
for u in auto input; do timeout 60 $E --sizes 6000 --gen-device cuda --sigma 0.2 --options "--option equivariance_units=$u" >> $OUT/log.txt 2>&1; done; el 6k_sigma20
for d in 0 4 7 9; do
  timeout 150 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{"max_epochs": 100}]' --out $OUT/sweep_$d.jsonl > /dev/null 2>&1 &
done
wait; el sweep
cat $OUT/sweep_*.jsonl > $OUT/sweep.jsonl; rm -f $OUT/sweep_?.jsonl
# (3) if time is left: the pair methods on the GPU (session15_call2.sh's first part; carry .whl too)
LEFT=$(( 585 - ($(date +%s) - T0) ))
if [ $LEFT -gt 90 ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl; then
  PYTHONPATH=/tmp/site:$PWD timeout $(( LEFT - 15 )) python bench/pairwise.py --pairs 32 --limit kornia=16 \
    --methods search,learned,ecc,kornia --device cuda --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1; el pairwise
  PYTHONPATH=/tmp/site:$PWD python bench/pairwise.py --report $OUT/pairwise_gpu.jsonl
fi
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], r["digit"], r["sigma"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), (r.get("notes") or [])[-1:])
for l in open("$OUT/sweep.jsonl"):
    r = json.loads(l); print("SW", r["digit"], r["cfg"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"))
PY
