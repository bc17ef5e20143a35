#!/usr/bin/env bash
# Ninth session, device call 1: the trainer before (.devold: the eighth session's code) and after
# the kernel-count reduction, on the same card; end-to-end jobs as a user runs them (congeal align
# on .npy shards of infiMNIST-style digit-3 collections, sigma 10 %) at 1k, 6k and 1M (with apply),
# scored against ground truth; the aligner's forward pass; quality on the benchmark pairs at the
# default and a shorter schedule; where a 1,024 step spends its time; the reference rule's size.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu,clocks.sm,clocks.max.sm --format=csv,noheader
python bench/gpu_speed.py --parts ceilings --out $R 2>&1 | grep -v '^{' | tail -1
python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 --steps 192 --out $R 2>&1 | grep -v '^{' | tail -1
(cd .devold && PYTHONPATH=$PWD python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 192 --out $OUT/old.jsonl 2>&1 | grep -v '^{' | tail -1)
python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl 2>&1 | grep -v '^{' | tail -1
timeout 330 python bench/e2e_jobs.py --sizes 1000000 --device cuda --apply --work /tmp/e2e --out $OUT/e2e.jsonl 2>&1 | grep -v '^{' | tail -1
timeout 60 python bench/gpu_speed.py --parts inference --out $R > $OUT/inference.txt 2>&1
timeout 60 python bench/gpu_speed.py --parts quality --sizes 1000 --quality-configs '[{}, {"steps": 600}]' --out $R 2>&1 | grep -v '^{' | tail -1
timeout 40 python bench/gpu_speed.py --parts inference_profile --out $R >> $OUT/inference.txt 2>&1
timeout 40 python bench/gpu_speed.py --parts profile --profile-batch 1024 --out $R > $OUT/profile1024.txt 2>&1
timeout 30 python bench/reference_size.py --sizes 1000000 --work /tmp/e2e --device cuda --out $OUT/refsize.jsonl 2>&1 | tail -1
python - <<'PY'
import json, os
O = os.environ["OUT"]
for f in ("old.jsonl", "speed.jsonl", "e2e.jsonl"):
    if not os.path.exists(os.path.join(O, f)): continue
    for l in open(os.path.join(O, f)):
        r = json.loads(l); p = r.get("part"); e = r.get("eval", {})
        if "error" in r: print("ERR", f, r)
        elif p == "throughput": print(f, "T", r["config"], r["batch"], r["ms_per_step"], r["images_per_s"], r["achieved_tflops"], "graph", r["graph"], "first_block_s", r["first_block_s"])
        elif p == "inference": print("I", r["chunk"], r["dtype"], r["images_per_s"])
        elif p == "quality": print("Q", r["digit"], r["config"], r["fit_seconds"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r["notes"][-1][:90])
        elif p == "profile": print("P", [(t["name"][:40], t["self_cuda_ms"]) for t in r["top"][:12]])
        elif p == "inference_profile": print("IP", r["dtype"], [(t["name"][:40], t["self_cuda_ms"]) for t in r["top"][:10]])
        elif p == "ceilings": print("C", r)
        elif p == "e2e": print("E2E", r["n_images"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "rss", r["peak_rss_mib"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), (r.get("schedule") or {}).get("steps"), r.get("apply"), r.get("stage_seconds"), (r.get("notes") or [])[-1:], (r.get("warnings") or [])[:1], r.get("log_tail", "")[-600:])
PY
