#!/bin/bash
# Session 7, call 5 (1 x H200): digit 1 at sigma 30 % twice (same pairs and seed; GPU kernels are not
# bit-deterministic), after the divergence guard; call 4's run of it diverged in its re-fit.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
T=500
run() { CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas $3 --n 500 --save-warps $R/w$6 --device cuda --configs "$4" --out $R/$5.jsonl > $R/log_$5_$2_$6.txt 2>&1 & }
run 0 1 0.3 '[{}]' defaults_s30 a
run 0 1 0.3 '[{}]' defaults_s30_repeat b
wait
tail -qn 1 $R/log_*.txt | cut -c1-100
cd $OUT && tar czf r.tgz r && rm -rf r
