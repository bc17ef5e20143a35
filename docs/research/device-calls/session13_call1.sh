#!/usr/bin/env bash
# Thirteenth session, device call 1 (issue 14). (1) Where the training step's device time goes at
# batch 1,024, the defaults and the narrow networks (eager profile, by kernel): ~28 ms of the
# graphed step did not scale with the networks' FLOPs. (2) The 1k job on the CPU-drawn collection
# with the defaults and with float32 arithmetic: does bf16 make the GPU's first fit crop?
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python bench/gpu_speed.py --device cuda --parts profile --profile-batch 1024 \
  --profile-configs '[{}, {"preset": "small", "width": 1}]' --out $OUT/profile.jsonl > $OUT/profile_log.txt 2>&1
echo "profile rc $?"
python - <<PY
import json
for l in open("$OUT/profile.jsonl"):
    r = json.loads(l)
    print("PROFILE", r["config"], "batch", r["batch"], "steps", r["steps"])
    for e in r["top"][:25]:
        print(f'  {e["self_cuda_ms"]:9.2f} ms {e["calls"]:6d}  {e["name"][:90]}')
PY
for o in "" "--option precision=float32"; do
  timeout 90 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "$o" --out $OUT/e2e.jsonl >> $OUT/e2e_log.txt 2>&1
  python -c "
import json; r = [json.loads(l) for l in open('$OUT/e2e.jsonl')][-1]; e = r.get('eval', {})
print('E2E', repr(r.get('options')), r['seconds'], 'rc', r['rc'], 'obj', e.get('object_residual_ratio'), 'corner', e.get('residual_ratio'), 'kept', e.get('content_kept'), 'frame', e.get('frame_size_median'))
print('  stages', r.get('stage_seconds'))
print('  notes', (r.get('notes') or [])[-2:])" 2>&1 | tail -3
done
