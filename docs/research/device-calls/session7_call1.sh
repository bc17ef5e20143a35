#!/bin/bash
# Session 7, call 1 (2 x H200): the defaults at sigma 0 on every digit (5 processes per GPU);
# each row now carries the object residual (0 by construction at sigma 0, like the corner one).
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
T=540
run() { CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas $3 --n 500 --device cuda --configs "$4" --out $R/$5.jsonl > $R/log_$5_$2.txt 2>&1 & }
for d in 0 1 2 3 4; do run 0 $d 0 '[{}]' defaults_s0; done
for d in 5 6 7 8 9; do run 1 $d 0 '[{}]' defaults_s0; done
wait
tail -qn 1 $R/log_*.txt | cut -c1-100
cd $OUT && tar czf r.tgz r && rm -rf r
