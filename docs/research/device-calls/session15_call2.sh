#!/usr/bin/env bash
# Fifteenth session, second call, as it ran (carry .devdata), on the H100 still warm from call 1
# (whose end ran the pair methods on the GPU, so this call left them out): the robustness protocol
# with the current defaults, digit 3, 1,000 images, canvas and frames at sigma 10 / 20 / 30 %, then
# the chelsea photograph at 10 % (200 images). Results: bench/results/session15/robustness_call2.jsonl.
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
timeout 300 python bench/robustness.py --sets canvas,frame --sigmas 0.1,0.2,0.3 --digits 3 --n 1000 --device cuda \
  --out $OUT/robustness.jsonl > $OUT/robustness_log.txt 2>&1; echo "## digits at $(( $(date +%s) - T0 ))"
timeout 150 python bench/robustness.py --sets photo --photos chelsea --sigmas 0.1 --n 200 --device cuda \
  --out $OUT/robustness.jsonl >> $OUT/robustness_log.txt 2>&1; echo "## photo at $(( $(date +%s) - T0 ))"
python -c "
import json
for l in open('$OUT/robustness.jsonl'):
    r=json.loads(l); print(r['set'],r['subject'],r['sigma'],'obj',r.get('object_residual_ratio'),'corner',r.get('residual_ratio'),'kept',r.get('content_kept'),'frame',r.get('frame_size_median'),'cons',r.get('consistency_ratio'),'vis',(r.get('visible') or {}).get('object_residual_ratio'),'s',r.get('wall_seconds'),(r.get('warnings') or [''])[0][:100],(r.get('notes') or [''])[-1][:140])
"
