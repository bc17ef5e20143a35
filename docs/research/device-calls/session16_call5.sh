#!/usr/bin/env bash
# Sixteenth session, fifth call. carry .devdata. About 130 s.
# The jobs table's headline rows on the current code (the stage blocks on the space-to-depth input):
# the 1M digit-3 job and the 6k one with the defaults (session 15: 48.4 s and 30.9-33.5 s).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
timeout 45 $E --sizes 6000 --gen-device cuda >> $OUT/log.txt 2>&1; el 6k
timeout 150 $E --sizes 1000000 --gen-device cuda >> $OUT/log.txt 2>&1; el 1m
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), r.get("stage_seconds"), (r.get("notes") or [""])[0][:100])
PY
