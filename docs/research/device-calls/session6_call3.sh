#!/bin/bash
# Session 6, call 3: equivariance in frame units at weight 2 on every digit at sigma 20 %, and a
# repeat of its sigma 10 % runs (call 1) for run-to-run spread.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
T=565
B='[{"equivariance_units":"frame","equivariance":2}]'
run() { CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas $3 --n 500 --device cuda --configs "$B" --out $R/$4.jsonl > $R/log_$4_$2.txt 2>&1 & }
for d in 0 1 2 3 4; do run 0 $d 0.2 frame_eq2_s20; done
for d in 5 6 7 8 9; do run 1 $d 0.2 frame_eq2_s20; done
for d in 0 1 2 3 4; do run 2 $d 0.1 frame_eq2_s10_repeat; done
for d in 5 6 7 8 9; do run 3 $d 0.1 frame_eq2_s10_repeat; done
wait
tail -qn 1 $R/log_*.txt | cut -c1-100
cd $OUT && tar czf r.tgz r && rm -rf r
