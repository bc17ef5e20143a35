#!/usr/bin/env bash
# Eighth session, device call 1 (one H200): ceilings, trainer throughput by batch and mode,
# a kernel profile, inference throughput, the previous trainer's step time, and quality of the
# new trainer at 1k / 6k / 64k images (digit 3, sigma 10 %).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv | tee $OUT/nvidia_smi.txt
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
R=$OUT/speed.jsonl
python bench/gpu_speed.py --parts ceilings,old,throughput --old .devdata/old --out $R 2>&1 | tail -n 40
python bench/gpu_speed.py --parts inference,profile --out $R 2>&1 | tail -n 45
python bench/gpu_speed.py --parts quality --sizes 1000,6000 --quality-configs '[{}, {"precision": "float32"}]' --out $R 2>&1 | grep -v "^{" | tail -n 5
python bench/gpu_speed.py --parts quality --sizes 65536 --quality-configs '[{}]' --out $R 2>&1 | grep -v "^{" | tail -n 5
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/speed.jsonl"):
    r = json.loads(l)
    if r["part"] == "quality":
        e = r["eval"]; print("Q", r["n_images"], r["config"], r["fit_seconds"], "corner", e["residual_ratio"], "obj", e["object_residual_ratio"], "kept", e["content_kept"], r["plan"]["batch_size"], r["plan"]["steps"])
    elif r["part"] == "throughput":
        print("T", r["config"], r["batch"], r["ms_per_step"], r["images_per_s"], r["achieved_tflops"], r["graph"])
    elif r["part"] in ("ceilings", "old", "inference"):
        print(r)
PY
