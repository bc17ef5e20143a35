#!/bin/bash
# Session 7, call 4 (2 x H200): the defaults at sigma 30 % on the four digits without saved warps (2 per GPU),
# warps saved; the rows carry the object residual (digits 4-9: bench/rescore_warps.py).
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
T=570
run() { CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas $3 --n 500 --save-warps $R/w --device cuda --configs "$4" --out $R/$5.jsonl > $R/log_$5_$2.txt 2>&1 & }
for d in 0 1; do run 0 $d 0.3 '[{}]' defaults_s30; done
for d in 2 3; do run 1 $d 0.3 '[{}]' defaults_s30; done
wait
tail -qn 1 $R/log_*.txt | cut -c1-100
cd $OUT && tar czf r.tgz r && rm -rf r
