#!/usr/bin/env bash
# Ninth session, the one device call that fitted (the session's device time went on failed starts:
# about 3 minutes were left): trainer throughput after the kernel-count reduction and before it
# (.devold: the eighth session's code) on the same card, and end-to-end jobs as a user runs them
# (congeal align on .npy shards of infiMNIST-style digit-3 collections, sigma 10 %) at 1k and 6k,
# scored against ground truth.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
timeout 40 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 --steps 96 --out $R 2>&1 | grep -v '^{' | tail -1
timeout 45 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl 2>&1 | grep -v '^{' | tail -1
(cd .devold && PYTHONPATH=$PWD timeout 40 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 96 --out $OUT/old.jsonl 2>&1 | grep -v '^{' | tail -1)
timeout 60 python bench/e2e_jobs.py --sizes 6000 --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl 2>&1 | grep -v '^{' | tail -1
