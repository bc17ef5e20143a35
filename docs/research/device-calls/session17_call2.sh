#!/usr/bin/env bash
# Written in the sixteenth session, for the next. carry .devdata. About 300 s.
# (1) The 1,000-image fits of digits 0 / 4 / 7 / 9 at a batch of 512 (session17_call1.sh's 1k job at
#     512 is digit 3; at 256: bench/results/session16/call4_sweep.jsonl). Four processes share the
#     card: the seconds are not speed figures. A batch rule for small collections is the question;
#     at 1M a larger batch cost quality (schedule.py's notes).
# (2) The units re-fit (units_refit, sixteenth session): the 6k jobs of digits 7 and 9, whose
#     frame-unit fits drifted (object ratio 0.137 / 0.359; in input units 0.111 / 0.063), with the
#     defaults: does the rule fire, and which fit is kept? Digit 3's 6k job (call 1) should not fire.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/tmp/pyc
unset PYTHONDONTWRITEBYTECODE
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
for d in 7 9; do timeout 70 $E --sizes 6000 --gen-device cuda --digit $d >> $OUT/log.txt 2>&1; done; el 6k_units
for d in 0 4 7 9; do
  timeout 150 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{"batch_size": 512}]' --out $OUT/sweep_$d.jsonl > $OUT/sweep_log_$d.txt 2>&1 &
done
wait; el sweep
cat $OUT/sweep_*.jsonl > $OUT/sweep.jsonl; rm -f $OUT/sweep_?.jsonl
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], r["digit"], r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), r.get("consistency_summary"), r.get("notes"))
for l in open("$OUT/sweep.jsonl"):
    r = json.loads(l)
    print("SW", r.get("digit"), r.get("cfg"), "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), (r.get("notes") or [""])[0][:70])
PY
