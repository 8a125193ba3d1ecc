"""DDP through torchrun semantics, checked with 2 CPU processes on gloo.

- 2 ranks x batch b give the losses, weights and validation metrics of 1 process with batch 2b
  (SyncBN, the sharded sampler and crops, the gradient all-reduce and the evaluation reduction);
- every rank ends with bit-identical students, EMA teachers, memory banks and running statistics;
- a DDP run stopped and resumed equals the uninterrupted run bit for bit (per-rank RNG states);
- CPUSyncBatchNorm2d equals BatchNorm2d on the concatenated batch, forward and backward.
"""
import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from semiseg_fast.config import TrainConfig
from semiseg_fast.engine.trainer import Trainer

WORLD = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp, name, **kw) -> TrainConfig:
    # image 48, crop 24: the smallest rescale (0.5) still covers the crop, so no pixel is padding
    # and every rank normalises its CE by the same pixel count (DDP averages per-rank means)
    base = dict(num_train=24, num_val=10, image_size=48, crop=24, batch_size=2, unlabeled_batch_size=2, iters=2,
                labeled="1/2", eval_every=0, ckpt_every=0, log_every=1, progress=False, log_backend="csv",
                cache_dir=os.path.join(tmp, "cache"), out=os.path.join(tmp, name), deterministic=True,
                eval_batch_size=4)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*args, **kwargs):
    pass


def _state(trainer):
    return {k: v.detach().cpu().clone() for k, v in trainer.method.state_dict().items()}


def _worker(rank, port, tmp, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        out = {}
        if job == "parity":
            t = Trainer(_cfg(tmp, "ddp", method="supervised"), echo=_quiet)
            metrics = t.train()
            out["miou"], out["pixels"] = metrics.miou, int(metrics.confusion.sum())
            out["state"] = _state(t)
        elif job == "identical":
            for method in ("u2pl", "ctt", "mllc"):
                t = Trainer(_cfg(tmp, f"id-{method}", method=method, iters=4, u2pl_sup_only=0.5), echo=_quiet)
                t.train()
                out[method] = _state(t)
        elif job == "resume":
            a = Trainer(_cfg(tmp, "straight", method="fixmatch", iters=4), echo=_quiet)
            a.train()
            Trainer(_cfg(tmp, "resumed", method="fixmatch", iters=4), echo=_quiet).train(max_steps=2)
            b = Trainer(_cfg(tmp, "resumed", method="fixmatch", iters=4, resume=True), echo=_quiet)
            assert b.step == 2
            b.train()
            out["straight"], out["resumed"] = _state(a), _state(b)
        elif job == "syncbn":
            out.update(_syncbn_case(rank))
        torch.save(out, os.path.join(tmp, f"{job}-rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _syncbn_case(rank):
    from semiseg_fast.engine.distributed import CPUSyncBatchNorm2d, init_distributed

    g = torch.Generator().manual_seed(5)
    full = torch.randn(6, 3, 5, 7, generator=g, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(6, 3, 5, 7, generator=g, dtype=torch.float64)
    env = init_distributed("cpu")  # joins the gloo group from the torchrun-style variables
    assert (env.rank, env.world) == (rank, WORLD)
    bn = CPUSyncBatchNorm2d(3, env=env).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    part = slice(rank * 3, rank * 3 + 3)
    x = full[part].clone().requires_grad_(True)
    y = bn(x)
    (y * upstream[part]).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var, "full": full, "upstream": upstream}


def _spawn(tmp_path, job):
    mp.spawn(_worker, args=(_port(), str(tmp_path), job), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{job}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _logged(run_dir, tag):
    with open(run_dir / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == tag]


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_ddp_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    ranks = _spawn(tmp_path, "parity")
    single = Trainer(_cfg(str(tmp_path), "single", method="supervised", batch_size=2 * WORLD), echo=_quiet)
    metrics = single.train()
    ref = _state(single)
    init = _state(Trainer(_cfg(str(tmp_path), "init", method="supervised"), echo=_quiet))
    # per-step losses: the mean of the ranks' losses (logged by rank 0) equals the global-batch loss
    ddp_loss, one_loss = _logged(tmp_path / "ddp", "train/loss"), _logged(tmp_path / "single", "train/loss")
    assert len(ddp_loss) == len(one_loss) == 2
    assert ddp_loss == pytest.approx(one_loss, rel=1e-4)
    # Weights: a from-scratch BN net on 4 tiny images is chaotic (a 1e-6 relative nudge of the
    # initial weights moves the step-3 loss by 1e-2), so summation-order noise is measured against
    # how far training moved the weights: 0.7 % here after 2 steps; without SyncBN it is 260 %.
    keys = [k for k, v in ref.items() if v.is_floating_point() and "running" not in k]
    gap = sum(float((ranks[0]["state"][k].double() - ref[k].double()).pow(2).sum()) for k in keys) ** 0.5
    moved = sum(float((ref[k].double() - init[k].double()).pow(2).sum()) for k in keys) ** 0.5
    assert moved > 0 and gap / moved < 0.05, gap / moved
    # evaluation: the ranks' shards together cover every validation pixel exactly once
    assert ranks[0]["pixels"] == 10 * 48 * 48 == int(metrics.confusion.sum())
    assert ranks[0]["miou"] == pytest.approx(metrics.miou, abs=5e-3)


def test_ddp_ranks_stay_identical_students_teachers_banks(tmp_path):
    r0, r1 = _spawn(tmp_path, "identical")
    for method in ("u2pl", "ctt", "mllc"):
        a, b = r0[method], r1[method]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, k)
    # the gathered enqueue actually filled U2PL's queues; MLLC's reduced prototypes were written
    assert int(r0["u2pl"]["bank.fill"].sum()) > 0
    assert bool(r0["mllc"]["proto_seen"].any()) and float(r0["mllc"]["proto"].abs().sum()) > 0


def test_ddp_resume_is_exact(tmp_path):
    for rank in _spawn(tmp_path, "resume"):
        for k, v in rank["straight"].items():
            assert torch.equal(v, rank["resumed"][k]), k


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    ranks = _spawn(tmp_path, "syncbn")
    full, upstream = ranks[0]["full"], ranks[0]["upstream"]
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    x = full.clone().requires_grad_(True)
    y = bn(x)
    (y * upstream).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad)
    # each rank holds its part of the parameter gradient; DDP's all-reduce sums them
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)
