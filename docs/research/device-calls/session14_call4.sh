#!/usr/bin/env bash
# Fourteenth session, device call 4 (issue 14): which term drives the GPU first fit's zoom-in
# (content kept ~0.67 at 1M always, at 6k on this session's collection). First fits alone
# (reframe=0) on the 6k collection that zoomed in call 3: the defaults again (is it reproducible?),
# equivariance in frame units (round 9: in input units the loss rewards cropping), no equivariance,
# the symmetric distance; then the two equivariance variants at 1M.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
for o in "" "--option equivariance_units=frame" "--option equivariance=0" "--option distance=symmetric"; do
  timeout 60 $E --sizes 6000 --options "--option reframe=0 $o" >> $OUT/log.txt 2>&1; el "6k $o"
done
for o in "--option equivariance_units=frame" "--option equivariance=0"; do
  LEFT=$(( 420 - ($(date +%s) - T0) ))
  [ $LEFT -gt 95 ] && timeout $LEFT $E --sizes 1000000 --gen-device cuda --options "--option reframe=0 $o" >> $OUT/log.txt 2>&1; el "1m $o"
done
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {}); f = r.get("framing_summary", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), "area", f.get("area_scale_median"), "train", (r.get("stage_seconds") or {}).get("fit_training"))
    print("  notes", (r.get("notes") or [])[-1:])
PY
