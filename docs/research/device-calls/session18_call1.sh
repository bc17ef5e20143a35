#!/usr/bin/env bash
# Written in the seventeenth session for the next (carry .devdata). About 450 s.
# (1) session17_call4.sh's diagnosis (never ran: no machine): with the guard and the fallback off,
#     how many frames each per-image test flags (a corner beyond 3 half-widths: the guard's test
#     until a901832; the frame's centre / horizon: its test since), and the truth of the pairs each
#     leaves, frames at sigma 20 % (twice: GPU training is not bit-reproducible) and 30 %.
# (2) the robustness protocol with the current defaults (the guard reading the centre): frames and
#     canvas at 20 / 30 %: does the guard now return the learned fits, and are they better than the
#     moment alignment (0.531 / 0.733; visible pairs 0.392 / 0.377)?
# (3) the pair search on the GPU after the pruning and the stopping tolerance (was 8 ms a pair).
# (4) the 1k and 6k jobs (their time and n_fallback).
set -uo pipefail; set -f  # no globbing: the configs hold brackets
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
D="python docs/research/diagnoses/guard_far_test.py --device cuda --out $OUT/guard_far.jsonl \
   --configs [{\"fallback\":false},{\"equivariance_units\":\"frame\",\"fallback\":false}]"
timeout 120 $D --sigmas 0.2,0.2 > $OUT/log.txt 2>&1; el diag20
timeout 90 $D --sigmas 0.3 >> $OUT/log.txt 2>&1; el diag30
timeout 200 python bench/robustness.py --sets frame,canvas --sigmas 0.2,0.3 --digits 3 --n 1000 --device cuda \
  --out $OUT/robustness.jsonl >> $OUT/log.txt 2>&1; el robustness
timeout 60 python bench/pairwise.py --pairs 32 --methods search --device cuda --out $OUT/pairwise.jsonl >> $OUT/log.txt 2>&1; el pairs
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
timeout 30 $E --sizes 1000 >> $OUT/log.txt 2>&1; timeout 45 $E --sizes 6000 --gen-device cuda >> $OUT/log.txt 2>&1; el jobs
python - <<PY
import json
for l in open("$OUT/guard_far.jsonl"):
    r = json.loads(l); g = lambda k: (r.get(k) or {})
    print("GF", r["sigma"], r["options"].get("equivariance_units", "auto"), "corner_far", r.get("n_corner_far"), "centre_off", r.get("n_centre_off"),
          "all", g("all").get("object_residual_ratio"), "visible", g("visible").get("object_residual_ratio"),
          "with corner_far", g("pairs_with_corner_far"), "with centre_off", g("pairs_with_centre_off"))
for l in open("$OUT/robustness.jsonl"):
    r = json.loads(l); v = r.get("visible") or {}
    print("ROB", r["set"], r["sigma"], "obj", r.get("object_residual_ratio"), "kept", r.get("content_kept"), "cons", r.get("consistency_ratio"),
          "fallback", r.get("n_fallback"), "vis", v.get("object_residual_ratio"), (r.get("warnings") or [""])[0][:100])
for l in open("$OUT/pairwise.jsonl"):
    r = json.loads(l); print("PAIR", r["set"], r["method"], r.get("seconds_per_pair"), r.get("under_1px"), r.get("under_3px"))
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], r["seconds"], "obj", e.get("object_residual_ratio"), (r.get("framing_summary") or {}).get("n_fallback"))
PY
