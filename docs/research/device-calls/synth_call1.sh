#!/bin/bash
# Synthetic collections on one H200: the generator's speed in memory and its chunk invariance
# there (bench/synth_speed.py), a 1,000,000-image collection written to disk
# (bench/make_collection.py, the product's .npy shards), and the chunked ground-truth scorer on
# it with the exact inverse transforms (bench/score_collection.py). CODE is the folder holding
# models/ and bench/ (the repository root, or a copy carried beside it).
CODE=${CODE:-.}
export CONGEAL_MNIST_NPZ=${CONGEAL_MNIST_NPZ:-.device/mnist.npz} PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $R/gpu.txt
timeout 150 python3 $CODE/bench/synth_speed.py --device cuda --n 1000000 --steps 32768,131072,524288 | tee $R/speed.json
for k in 1 2; do
  rm -rf /tmp/c1m
  timeout 120 python3 $CODE/bench/make_collection.py --digit 3 --n 1000000 --sigma 0.1 --out /tmp/c1m \
    --device cuda --chunk 262144 --quiet | tee -a $R/make.jsonl
done
du -sh /tmp/c1m | tee $R/du.txt
python3 -c "import numpy as np; np.save('/tmp/exact.npy', np.linalg.inv(np.load('/tmp/c1m/truth/src_from_input.npy')))"
timeout 150 python3 $CODE/bench/score_collection.py /tmp/c1m /tmp/exact.npy --device cuda --chunk 65536 | tee $R/score.json
