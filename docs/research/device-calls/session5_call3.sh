#!/bin/bash
# Call 3: sigma 20 %: defaults (repeat, warps saved) and equivariance 2, all digits.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/w
T=530
run() { # gpu digit configs tag
  CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas 0.2 --n 500 --device cuda --configs "$3" --out $R/$4.jsonl --save-warps $R/w/$4 > $R/log_$4_$2.txt 2>&1 &
}
E='[{"equivariance":2}]'
for d in 0 1 2 3 4; do run 0 $d '[{}]' def_s20; done
for d in 5 6 7 8 9; do run 1 $d '[{}]' def_s20; done
for d in 0 1 2 3 4; do run 2 $d "$E" eq2_s20; done
for d in 5 6 7 8 9; do run 3 $d "$E" eq2_s20; done
wait
tail -qn 1 $R/log_*.txt | cut -c1-200
cd $OUT && tar czf r.tgz r && rm -rf r
