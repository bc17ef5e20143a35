#!/usr/bin/env bash
# Sixteenth session, third call (on the warm machine of calls 1-2). carry .devdata. About 330 s.
# (1) The MNIST aligner on the 56 px canvas at sigma 20 / 30 % (call 2: at 10 % it aligned, object
#     ratio 0.082, where the LFW aligner that sizes above 48 px get collapsed), and on a 64 px
#     photograph (chelsea, 10 %; the LFW aligner: 0.851).
# (2) The paper's frames at 30 % with the equivariance distance in frame units (call 2: at 20 % the
#     visible pairs reached 0.142 in frame units where input units collapsed).
# (3) The 1k job twice in a row (the first job on a fresh machine pays cold caches) and at
#     max_epochs=200.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
R="python bench/robustness.py --digits 3 --n 1000 --device cuda --out $OUT/robustness.jsonl"
timeout 30 $E --sizes 1000 >> $OUT/log.txt 2>&1; el 1k_again
timeout 25 $E --sizes 1000 --options "--option max_epochs=200" >> $OUT/log.txt 2>&1; el 1k200
timeout 90 $R --sets canvas --sigmas 0.2 --dprc-options '{"preset": "mnist"}' >> $OUT/rob_log.txt 2>&1; el canvas20_mnist
timeout 100 $R --sets canvas --sigmas 0.3 --dprc-options '{"preset": "mnist"}' >> $OUT/rob_log.txt 2>&1; el canvas30_mnist
timeout 30 $R --sets frame --sigmas 0.3 --dprc-options '{"equivariance_units": "frame"}' >> $OUT/rob_log.txt 2>&1; el frame30_frame
timeout 50 python bench/robustness.py --sets photo --photos chelsea --sigmas 0.1 --n 200 --device cuda --dprc-options '{"preset": "mnist"}' --out $OUT/robustness.jsonl >> $OUT/rob_log.txt 2>&1; el chelsea_mnist
python - <<PY
import json, os
for l in (open("$OUT/e2e.jsonl") if os.path.exists("$OUT/e2e.jsonl") else []):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("stage_seconds"))
for l in (open("$OUT/robustness.jsonl") if os.path.exists("$OUT/robustness.jsonl") else []):
    r = json.loads(l); v = r.get("visible") or {}
    print(r["set"], r["sigma"], r.get("options"), "obj", r.get("object_residual_ratio"), "visible", v.get("object_residual_ratio"), v.get("pairs"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"),
          "frame", r.get("frame_size_median"), "cons", r.get("consistency_ratio"), "s", r.get("wall_seconds"), (r.get("warnings") or [""])[0][:90], (r.get("notes") or [""])[-1][:120])
PY
