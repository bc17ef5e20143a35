#!/usr/bin/env bash
# Ninth session, device call 1: the trainer before (.devold: the eighth session's code) and after
# the kernel-count reduction, on the same card; torch.compile measured; where a 1,024 step and the
# aligner's forward pass spend their time; quality of the new trainer on the benchmark pairs
# (digit 3 and 1, sigma 10 %, 1,000 images) at the default and shorter schedules.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu,clocks.sm,clocks.max.sm --format=csv,noheader
python bench/gpu_speed.py --parts ceilings --out $R 2>&1 | grep -v '^{' | tail -1
(cd .devold && PYTHONPATH=$PWD python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 192 --out $OUT/old.jsonl 2>&1 | grep -v '^{' | tail -2)
python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024,4096 --steps 192 --out $R 2>&1 | grep -v '^{' | tail -2
python bench/gpu_speed.py --parts profile --profile-batch 1024 --out $R > $OUT/profile1024.txt 2>&1
python bench/gpu_speed.py --parts inference,inference_profile --out $R > $OUT/inference.txt 2>&1
python bench/gpu_speed.py --parts quality --sizes 1000 --quality-configs '[{}, {"steps": 600}, {"steps": 400}]' --out $R 2>&1 | grep -v '^{' | tail -2
python bench/gpu_speed.py --parts quality --sizes 1000 --digit 1 --quality-configs '[{}]' --out $R 2>&1 | grep -v '^{' | tail -1
timeout 150 python bench/gpu_speed.py --parts throughput --configs '[{"compile": true}]' --batches 256 --steps 128 --out $R > $OUT/compile.txt 2>&1
python - <<'PY'
import json, os
O = os.environ["OUT"]
for f in ("old.jsonl", "speed.jsonl"):
    for l in open(os.path.join(O, f)):
        r = json.loads(l)
        p = r.get("part")
        if "error" in r: print("ERR", f, r)
        elif p == "throughput": print(f, "T", r["config"], r["batch"], r["ms_per_step"], r["images_per_s"], r["achieved_tflops"], "graph", r["graph"], "first_block_s", r["first_block_s"])
        elif p == "inference": print("I", r["chunk"], r["dtype"], r["images_per_s"])
        elif p == "quality": e = r["eval"]; print("Q", r["digit"], r["config"], r["fit_seconds"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r["notes"][-1][:90])
        elif p == "profile": print("P", [(t["name"][:40], t["self_cuda_ms"]) for t in r["top"][:12]])
        elif p == "inference_profile": print("IP", r["dtype"], [(t["name"][:40], t["self_cuda_ms"]) for t in r["top"][:10]])
        elif p == "ceilings": print("C", r)
PY
