#!/usr/bin/env bash
# Thirteenth session, device call 4 (issue 14; never run: the session's device time went on failed
# machine starts). The step's steady state at 256 and 1,024, before (.devold: `git archive HEAD
# models bench/gpu_speed.py bench/baselines_common.py congeal | tar -x -C .devold`) and after
# session13_nets.patch (`git apply docs/research/device-calls/session13_nets.patch`: channels-last
# stage and auto-encoder inputs, the 2x2 max-pool as a reshape and a max on a GPU; reverted from
# main until measured). Note: a 1-channel NCHW tensor already counts as channels-last contiguous, so
# its .contiguous(channels_last) may be a no-op; check the profile's nchwToNhwc count too.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for root in .devold .; do
  timeout 45 python $root/bench/gpu_speed.py --device cuda --parts throughput --batches 256,1024 --steps 128 --configs '[{}]' --out $OUT/speed_$(basename $root).jsonl >> $OUT/speed_log.txt 2>&1
done
python -c "
import json
for tag, f in (('before', '.devold'), ('after', '.')):
    for l in open(f'$OUT/speed_{f}.jsonl'):
        r = json.loads(l); print(tag, r['part'], r.get('batch'), r.get('ms_per_step'), r.get('images_per_s'), r.get('step_gflop'), r.get('achieved_tflops'), r.get('fit_seconds'), r.get('error'))"
