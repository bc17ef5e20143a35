#!/bin/bash
# Session 6, call 2: equivariance with a fixed target (weight 1 and 2) at sigma 10 % on every digit;
# frame-units failures and the defaults re-run on digits 5 and 9 for their frame size.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
T=555
A='[{"equivariance_target":"fixed"}]'
B='[{"equivariance_target":"fixed","equivariance":2}]'
run() { CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas 0.1 --n 500 --device cuda --configs "$3" --out $R/$4.jsonl > $R/log_$4_$2.txt 2>&1 & }
for d in 0 1 2 3 4; do run 0 $d "$A" fixed_eq1_s10; done
for d in 5 6 7 8 9; do run 1 $d "$A" fixed_eq1_s10; done
for d in 0 1 2 3 4; do run 2 $d "$B" fixed_eq2_s10; done
for d in 5 6 7 8 9; do run 3 $d "$B" fixed_eq2_s10; done
run 0 5 '[{"equivariance_units":"frame","equivariance":2}]' diag_frame
run 1 9 '[{"equivariance_units":"frame"}]' diag_frame
run 2 5 '[{}]' diag
run 3 9 '[{}]' diag
wait
tail -qn 1 $R/log_*.txt | cut -c1-120
cd $OUT && tar czf r.tgz r && rm -rf r
