#!/usr/bin/env bash
# Sixteenth session, (2) and (3) of session16_call1.sh's header (the robustness first fits and the
# 6k digits 7 / 9 in input units), with the stage blocks on the space-to-depth input (the default
# since this session; the same function), and the canvas (56 px) with the MNIST aligner instead of
# the LFW one that sizes above 48 px get: the canvas at 10 % collapsed with the LFW aligner (zoomed
# in 5x) where the frames at 10 % did not. carry .devdata. About 310 s.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
R="python bench/robustness.py --digits 3 --n 1000 --device cuda --out $OUT/robustness.jsonl"
timeout 40 $R --sets canvas --sigmas 0.1 --dprc-options '{"reframe": 0, "guard": false}' >> $OUT/rob_log.txt 2>&1; el canvas_first
timeout 50 $R --sets canvas --sigmas 0.1 --dprc-options '{"preset": "mnist"}' >> $OUT/rob_log.txt 2>&1; el canvas_mnist
timeout 70 $R --sets canvas --sigmas 0.3 --dprc-options '{"preset": "mnist"}' >> $OUT/rob_log.txt 2>&1; el canvas30_mnist
timeout 30 $R --sets frame --sigmas 0.2 --dprc-options '{"reframe": 0, "guard": false}' >> $OUT/rob_log.txt 2>&1; el frame20_first
timeout 40 $R --sets frame --sigmas 0.2 --dprc-options '{"equivariance_units": "frame"}' >> $OUT/rob_log.txt 2>&1; el frame20_frame
for d in 7 9; do timeout 45 $E --sizes 6000 --gen-device cuda --digit $d --options "--option equivariance_units=input" >> $OUT/log.txt 2>&1; done; el 6k_input
python - <<PY
import json
for l in (open("$OUT/e2e.jsonl") if __import__("os").path.exists("$OUT/e2e.jsonl") else []):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("stage_seconds"))
for l in (open("$OUT/robustness.jsonl") if __import__("os").path.exists("$OUT/robustness.jsonl") else []):
    r = json.loads(l)
    print(r["set"], r["sigma"], r.get("options"), "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"),
          "frame", r.get("frame_size_median"), "area", r.get("area_scale_median"), "cons", r.get("consistency_ratio"), "diverged", r.get("frac_diverged"),
          "collapsed", r.get("frac_collapsed"), "s", r.get("wall_seconds"), (r.get("warnings") or [""])[0][:90], (r.get("notes") or [""])[-1][:120])
PY
