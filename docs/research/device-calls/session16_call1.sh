#!/usr/bin/env bash
# Written in the fifteenth session (its third call: the machine was taken back before it ran),
# split in two and extended in the sixteenth: this call (1), (4), (5); session16_call2.sh (2), (3).
# carry .devdata. About 420 s.
# (1) The 1k job's start-up without byte-compiling: call 1's profile showed 4.2 s of `compile` (the
#     device's torch has no cached bytecode and cannot write it), which an installed product (pip
#     writes .pyc) does not pay. PYTHONPYCACHEPREFIX sends the bytecode to /tmp; a first import
#     fills it, then the jobs run as on an installed machine (and with the trainer's Adam that no
#     longer imports torch._dynamo).
# (2) Call 2's collapses on digit 3 (canvas sigma 10 %, frames sigma 20 %): the first fit alone
#     (no re-fit, no guard) by the ground truth, and the first fit in frame units.
# (3) Call 1's 6k digits 7 and 9 drifted large in frame units (object ratio 0.137 / 0.359, frames
#     1.30 / 1.28): the same jobs in input units.
# (4) The trainer's FusedAdam (no torch.optim.Optimizer since the fifteenth session) on a GPU: the
#     steady step at 256 and 1,024 against session 14's 13.7 / 38.5 ms (speed_call2_head.jsonl).
# (5) Added in the sixteenth session: the stage's conv -> ReLU -> max-pool blocks computed on the 2x2
#     space-to-depth input (models.nets.conv_relu_pool_s2d) against cuDNN's direct convolution, and
#     where the trained aligner's forward pass (inference) spends its device time (never profiled).
#     The jobs above run with the blocks on (the product's default since this session); (4) and the
#     inference rows measure both ({"s2d_max_in": 0}: off).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"; unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pyc
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
timeout 60 python bench/conv_shapes.py --device cuda --blocks --batches 256,2048 --out $OUT/blocks.jsonl > $OUT/blocks_log.txt 2>&1; el blocks
TIMEFORMAT="imports: %R s"
for i in 1 2; do time python -c "import models.pipeline, torch._dynamo; import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)])"; done
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
timeout 45 $E --sizes 1000 >> $OUT/log.txt 2>&1; el 1k
timeout 35 $E --sizes 1000 --options "--option max_epochs=150" >> $OUT/log.txt 2>&1; el 1k150
timeout 120 python bench/gpu_speed.py --parts throughput --batches 256,1024 --configs '[{"s2d_max_in": 0}, {}]' --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1; el speed
timeout 150 python bench/gpu_speed.py --parts inference,inference_profile --inference-configs '[{"s2d_max_in": 0}, {}]' --out $OUT/speed.jsonl > $OUT/infer_profile.txt 2>&1; el infer_profile
cat $OUT/blocks.jsonl
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("stage_seconds"))
for l in (open("$OUT/robustness.jsonl") if __import__("os").path.exists("$OUT/robustness.jsonl") else []):
    r = json.loads(l)
    print(r["set"], r["sigma"], r.get("options"), "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"),
          "frame", r.get("frame_size_median"), "area", r.get("area_scale_median"), "cons", r.get("consistency_ratio"), "diverged", r.get("frac_diverged"),
          "collapsed", r.get("frac_collapsed"), "s", r.get("wall_seconds"), (r.get("warnings") or [""])[0][:90], (r.get("notes") or [""])[-1][:120])
PY
