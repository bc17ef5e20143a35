"""One job over several processes (gloo on the CPU, as CI runs it; NCCL on GPUs is the same code)."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from models.dprc import DPRC
from models.methods import shard_bounds
from models.perturb import make_pairs


def test_shards_cover_the_collection_once_in_order():
    for n, w in ((10, 3), (7, 7), (1000, 4), (5, 1)):
        b = shard_bounds(n, w)
        assert b[0] == 0 and b[-1] == n and all(b2 - b1 in (n // w, n // w + 1) for b1, b2 in zip(b, b[1:]))


def _grad_worker(rank, world, port, x, noise, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    obj = _objective(x)
    model = DDP(obj, broadcast_buffers=False)
    half = x.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    loss, _, _ = model(x[sl], torch.zeros(half, 1, 1, 1), noise[sl], 1.0, None, True)
    loss.backward()
    if rank == 0:
        torch.save([p.grad.clone() for p in obj.parameters()], out)
    dist.destroy_process_group()


def _objective(x):
    from models.dprc import DPRCAligner
    from models.dprc_train import Objective

    m = DPRC(preset="small", width=1)
    cfg = m.resolved("cpu", (28, 28))
    net, ae = m._nets(1, (28, 28), "homography", cfg)
    # Non-zero heads, so the warp (and its gradient) depends on the images.
    with torch.no_grad():
        for st in net.stages:
            st.out.weight.normal_(0, 1e-3)
    al = DPRCAligner(net, "moments", torch.zeros(2), torch.tensor(0.4))
    return Objective(al, ae, cfg, x[:1], torch.zeros(1, 1, 1, 1), torch.zeros(2), torch.tensor(0.4), 1.7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_step_one_process_takes_on_the_whole_batch(digits3, tmp_path):
    """DDP averages the two halves' gradients; the loss is a mean over the batch; so the step
    two processes take equals one process's step on the union of their batches."""
    x = make_pairs(digits3[:8], 0.1, seed=1).images  # 16 images
    noise = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    mp.spawn(_grad_worker, args=(2, _free_port(), x, noise, str(tmp_path / "g.pt")), nprocs=2, join=True)
    torch.manual_seed(0)
    obj = _objective(x)
    loss, _, _ = obj(x, torch.zeros(16, 1, 1, 1), noise, 1.0, None, True)
    loss.backward()
    two = torch.load(tmp_path / "g.pt")
    one = [p.grad for p in obj.parameters()]
    assert len(one) == len(two) and all(g.abs().sum() > 0 for g in one[-4:])
    for a, b in zip(one, two):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_a_job_over_two_processes_writes_what_its_model_reproduces(digits3, tmp_path):
    """Each process trains on its shard; rank 0 gathers the warps in shard order and writes them.
    The saved model (identical on every process) must give back exactly those warps, image by image:
    a mis-ordered gather or a model that differs between processes fails here."""
    from models.pipeline import AlignOptions, align_collection, apply_model

    pairs = make_pairs(digits3[:21], 0.1, seed=3)  # 42 images: shards of 21, a 3-way split is uneven
    np.save(tmp_path / "x.npy", (pairs.images[:, 0].numpy() * 255).round().astype(np.uint8))
    opts = AlignOptions(device="cpu", budget=3, gpus=3, method_options={"batch_size": 12, "reframe": 0})
    rep = align_collection(tmp_path / "x.npy", tmp_path / "out", opts)
    assert rep.n_images == 42
    T = np.load(tmp_path / "out" / "transforms.npy")
    assert T.shape == (42, 3, 3) and np.isfinite(T).all() and not np.allclose(T, np.eye(3))
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "3 processes" in " ".join(m["notes"]) and m["schedule"]["batch_size"] == 12
    apply_model(tmp_path / "out" / "model", tmp_path / "x.npy", tmp_path / "again", device="cpu")
    assert np.allclose(np.load(tmp_path / "again" / "transforms.npy"), T, atol=1e-5)
