#!/usr/bin/env bash
# Seventeenth session, fourth call (carry .devdata). About 150 s.
# The guard's per-image "flown off" test reads the aligned frame's corners (beyond 3 half-widths);
# the per-image fallback reads its centre. Call 3's frames at 20 % in frame units passed the guard
# once (object ratio 0.305, visible pairs 0.142) and failed it once on 696 "flown" frames. With the
# guard off and the fallback off (the learned warps as they are), how many frames does each test
# flag, and how good are the pairs each test leaves, against the truth? Sigma 20 % twice (GPU runs
# are not bit-reproducible), 30 % once; input units (the 1k default) and frame units.
set -uo pipefail; set -f  # no globbing: the configs hold brackets
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
D="python docs/research/diagnoses/guard_far_test.py --device cuda --out $OUT/guard_far.jsonl \
   --configs [{\"fallback\":false},{\"equivariance_units\":\"frame\",\"fallback\":false}]"
timeout 120 $D --sigmas 0.2,0.2 > $OUT/log.txt 2>&1; el s20
timeout 90 $D --sigmas 0.3 >> $OUT/log.txt 2>&1; el s30
python - <<PY
import json
for l in open("$OUT/guard_far.jsonl"):
    r = json.loads(l)
    if "error" in r:
        print("ERR", r); continue
    g = lambda k: (r.get(k) or {})
    print("GF", r["sigma"], r["options"].get("equivariance_units", "auto"), "corner_far", r["n_corner_far"], "centre_off", r["n_centre_off"],
          "all", g("all").get("object_residual_ratio"), "kept", g("all").get("content_kept"),
          "visible", g("visible").get("pairs"), g("visible").get("object_residual_ratio"),
          "w/o corner_far", g("pairs_without_corner_far").get("pairs"), g("pairs_without_corner_far").get("object_residual_ratio"),
          "with corner_far", g("pairs_with_corner_far").get("pairs"), g("pairs_with_corner_far").get("object_residual_ratio"),
          "w/o centre_off", g("pairs_without_centre_off").get("pairs"), g("pairs_without_centre_off").get("object_residual_ratio"),
          "with centre_off", g("pairs_with_centre_off").get("pairs"), g("pairs_with_centre_off").get("object_residual_ratio"))
PY
