#!/bin/bash
# Session 6, call 1: equivariance in frame units (weight 1 and 2) at sigma 10 % on every digit.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
python -c "import torch; print(torch.__version__)" >> $R/gpu.txt
T=545
A='[{"equivariance_units":"frame"}]'
B='[{"equivariance_units":"frame","equivariance":2}]'
for d in 0 1 2 3 4; do CUDA_VISIBLE_DEVICES=0 timeout $T python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs "$A" --out $R/frame_eq1_s10.jsonl > $R/log_a_$d.txt 2>&1 & done
for d in 5 6 7 8 9; do CUDA_VISIBLE_DEVICES=1 timeout $T python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs "$A" --out $R/frame_eq1_s10.jsonl > $R/log_a_$d.txt 2>&1 & done
for d in 0 1 2 3 4; do CUDA_VISIBLE_DEVICES=2 timeout $T python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs "$B" --out $R/frame_eq2_s10.jsonl > $R/log_b_$d.txt 2>&1 & done
for d in 5 6 7 8 9; do CUDA_VISIBLE_DEVICES=3 timeout $T python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs "$B" --out $R/frame_eq2_s10.jsonl > $R/log_b_$d.txt 2>&1 & done
wait
tail -n 2 $R/log_*.txt | cut -c1-300
cd $OUT && tar czf r.tgz r && rm -rf r
