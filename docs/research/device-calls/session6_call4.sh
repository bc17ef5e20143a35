#!/bin/bash
# Session 6, call 4: equivariance in frame units at weight 2 on every digit at sigma 30 %; the
# defaults repeated at sigma 10 % on digits 1 and 7 (run-to-run spread).
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
T=330
B='[{"equivariance_units":"frame","equivariance":2}]'
run() { CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas $3 --n 500 --device cuda --configs "$4" --out $R/$5.jsonl > $R/log_$5_$2.txt 2>&1 & }
for d in 0 1 2; do run 0 $d 0.3 "$B" frame_eq2_s30; done
for d in 3 4 5; do run 1 $d 0.3 "$B" frame_eq2_s30; done
for d in 6 7 8; do run 2 $d 0.3 "$B" frame_eq2_s30; done
run 3 9 0.3 "$B" frame_eq2_s30
run 3 1 0.1 '[{}]' defaults_s10_repeat
run 3 7 0.1 '[{}]' defaults_s10_repeat
wait
tail -qn 1 $R/log_*.txt | cut -c1-100
cd $OUT && tar czf r.tgz r && rm -rf r
