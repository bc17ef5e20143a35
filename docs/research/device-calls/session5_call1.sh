#!/bin/bash
# Call 1: width4+b256 (defaults) + equivariance 2 at sigma 10 % on all digits; defaults at sigma 30 % digits 0-3; single-job timing.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > $R/gpu.txt
python -c "import torch; print(torch.__version__)" >> $R/gpu.txt
T=560
for d in 0 1 2 3 4; do CUDA_VISIBLE_DEVICES=0 timeout $T python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{"equivariance":2}]' --out $R/eq2_s10.jsonl > $R/log_eq2_$d.txt 2>&1 & done
for d in 5 6 7 8 9; do CUDA_VISIBLE_DEVICES=1 timeout $T python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{"equivariance":2}]' --out $R/eq2_s10.jsonl > $R/log_eq2_$d.txt 2>&1 & done
for d in 0 1 2 3; do CUDA_VISIBLE_DEVICES=2 timeout $T python bench/sweep.py --digits $d --sigmas 0.3 --n 500 --device cuda --configs '[{}]' --out $R/def_s30.jsonl > $R/log_s30_$d.txt 2>&1 & done
CUDA_VISIBLE_DEVICES=3 timeout $T python bench/scaling.py --device cuda --threads 8 --methods dprc --digits 3 --sigmas 0.1 --n 1000,6000,1000 --out $R/scaling_single.json > $R/log_scaling.txt 2>&1 &
wait
tail -n 3 $R/log_*.txt | cut -c1-300
cd $OUT && tar czf r.tgz r && rm -rf r
