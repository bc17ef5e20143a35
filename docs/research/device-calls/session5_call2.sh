#!/bin/bash
# Call 2: sigma 30 %: defaults on digits 4-9 (the table), reference_frame "normalised" on all digits. Warps saved.
export CONGEAL_MNIST_NPZ=.device/mnist.npz PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/w
T=570
run() { # gpu digit configs tag
  CUDA_VISIBLE_DEVICES=$1 timeout $T python bench/sweep.py --digits $2 --sigmas 0.3 --n 500 --device cuda --configs "$3" --out $R/$4.jsonl --save-warps $R/w/$4 > $R/log_$4_$2.txt 2>&1 &
}
N='[{"reference_frame":"normalised"}]'
for d in 4 5 6; do run 0 $d '[{}]' def_s30; done; run 0 0 "$N" norm_s30
for d in 7 8 9; do run 1 $d '[{}]' def_s30; done; run 1 1 "$N" norm_s30
for d in 2 3 4 5; do run 2 $d "$N" norm_s30; done
for d in 6 7 8 9; do run 3 $d "$N" norm_s30; done
wait
tail -qn 1 $R/log_*.txt | cut -c1-260
cd $OUT && tar czf r.tgz r && rm -rf r
