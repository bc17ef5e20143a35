#!/usr/bin/env bash
# Twelfth session, device call 1 (issue 14 first). Does the GPU trainer with the CPU's networks
# (the small auto-encoder, Table 1's DeSTNet width) train faster and keep quality, and does it
# stop the 1k job's crop? Throughput of the four combinations, a profile of the narrow one, the 1k
# job with each, the 6k quality fit with each, the convolutions alone, then pairwise beside kornia.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
S=$OUT/speed.jsonl
timeout 60 python bench/gpu_speed.py --parts throughput --batches 1024 --configs '[{}]' --out $S > $OUT/speed_log.txt 2>&1
timeout 120 python bench/gpu_speed.py --parts throughput --batches 1024,4096 --configs '[{"width": 1}, {"preset": "small"}, {"preset": "small", "width": 1}]' --out $S >> $OUT/speed_log.txt 2>&1
python -c "
import json
for l in open('$S'):
    r = json.loads(l); print('THR', r.get('config'), r.get('batch'), r.get('ms_per_step'), r.get('images_per_s'), r.get('step_gflop'), r.get('achieved_tflops'), r.get('graph'), r.get('error'))"
for o in "--option reframe=0" "--option reframe=0 --option preset=small --option width=1" "--option preset=small --option width=1" "--option preset=small --option width=1 --option steps_target=600"; do
  timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "$o" --out $OUT/e2e.jsonl >> $OUT/e2e_log.txt 2>&1
  python -c "
import json; r = [json.loads(l) for l in open('$OUT/e2e.jsonl')][-1]; e = r.get('eval', {})
print('E2E', r.get('options'), r['seconds'], 'rc', r['rc'], 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), 'frame', e.get('frame_size_median'), r.get('stage_seconds'), (r.get('notes') or [])[-2:])" 2>&1 | tail -1
done
timeout 90 python bench/gpu_speed.py --parts quality --sizes 6000 --quality-configs '[{"preset": "small", "width": 1}, {}]' --out $OUT/quality.jsonl > $OUT/quality_log.txt 2>&1
python -c "
import json
for l in open('$OUT/quality.jsonl'):
    r = json.loads(l); e = r.get('eval', {}); print('Q', r.get('n_images'), r.get('config'), r.get('fit_seconds'), 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), r.get('error'))"
timeout 40 python bench/gpu_speed.py --parts profile --profile-batch 4096 --profile-configs '[{"preset": "small", "width": 1}]' --out $OUT/profile.jsonl > $OUT/profile_log.txt 2>&1
grep -A 24 "Self CPU %" $OUT/profile_log.txt | cut -c1-60,100-200 | head -26
timeout 40 python bench/conv_shapes.py --device cuda --batches 4096,12288 --reps 10 --out $OUT/conv.jsonl > /dev/null 2>&1
python -c "
import json
for l in open('$OUT/conv.jsonl'):
    r = json.loads(l); print('CONV', r['shape'], r['batch'], r['impl'], r['dtype'], r.get('ms'), r.get('tflops'), r.get('error', '')[:80])"
timeout 110 python bench/pairwise.py --pairs 32 --methods learned,ecc,kornia --limit kornia=8 --device cuda --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1
tail -n 14 $OUT/pairwise_log.txt
