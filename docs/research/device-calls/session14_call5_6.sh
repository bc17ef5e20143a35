#!/usr/bin/env bash
# Fourteenth session, device calls 5 and 6 (issue 14), run as single commands on the machine still
# warm from call 4 (under 240 s of device time left). Call 5: the 1M job with frame units at 256 a
# step; call 6: the 1k job with frame units, and at max_epochs=150. Carry .devdata.
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONPATH=$PWD
# call 5
timeout 150 python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl --sizes 1000000 --gen-device cuda \
  --options "--option reframe=0 --option equivariance_units=frame --option batch_size=256" > $OUT/log.txt 2>&1
# call 6
for o in "--option equivariance_units=frame" "--option equivariance_units=frame --option max_epochs=150"; do
  timeout 45 python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl --sizes 1000 --options "$o" >> $OUT/log.txt 2>&1
done
