"""End-to-end engine behaviour on tiny synthetic runs: learning, exact resume, bad input, NaN."""
import csv
import json

import pytest
import torch

from semiseg_fast.cli import main
from semiseg_fast.config import TrainConfig
from semiseg_fast.data.registry import SegData
from semiseg_fast.engine.checkpoint import load_checkpoint
from semiseg_fast.engine.trainer import Trainer
from semiseg_fast.errors import DataError


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(num_train=48, num_val=12, image_size=40, crop=32, batch_size=4, iters=6, eval_every=0,
                ckpt_every=0, log_every=2, progress=False, log_backend="csv", cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / "run"), labeled="1/4", eval_batch_size=12)
    base.update(kw)
    return TrainConfig(**base)


def _logged(run_dir, tag):
    with open(run_dir / "metrics.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == tag]


def test_short_supervised_run_learns(tmp_path):
    cfg = tiny(tmp_path, method="supervised", iters=60, lr=0.05, labeled="1.0", num_train=64, num_val=16,
               log_every=5, eval_every=60)
    trainer = Trainer(cfg, echo=lambda *a: None)
    metrics = trainer.train()
    losses = _logged(tmp_path / "run", "train/loss")
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2, losses
    # chance level: the expected mIoU of a uniform random prediction on these labels
    freq = torch.bincount(trainer.data.val_labels.flatten().long(), minlength=trainer.num_classes).double()
    freq = freq / freq.sum()
    c = freq.numel()
    chance = float(((freq / c) / (freq + 1 / c - freq / c)).mean())
    assert metrics.miou > 2 * chance, (metrics.miou, chance)
    assert (tmp_path / "run" / "best.pt").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "supervised" and saved["iters"] == 60


def test_exact_resume_fixmatch(tmp_path):
    # N iterations in one run == N/2, stop, resume, N/2 more: bit for bit on CPU
    cfg_a = tiny(tmp_path, method="fixmatch", deterministic=True, out=str(tmp_path / "a"))
    a = Trainer(cfg_a, echo=lambda *x: None)
    a.train()
    cfg_b = tiny(tmp_path, method="fixmatch", deterministic=True, out=str(tmp_path / "b"))
    Trainer(cfg_b, echo=lambda *x: None).train(max_steps=3)
    assert load_checkpoint(tmp_path / "b" / "latest.pt")["step"] == 3
    cfg_b.resume = True
    b = Trainer(cfg_b, echo=lambda *x: None)
    assert b.step == 3
    b.train()
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the teacher really moved (EMA) and differs from the student
    assert not torch.equal(sa["teacher.decoder.classifier.weight"], sa["student.decoder.classifier.weight"])
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    assert a.generator.get_state().equal(b.generator.get_state())


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["--method", "nope"], "--method"),
        (["--data", "nope"], "--data"),
        (["--labeled", "0"], "--labeled"),
        (["--lr", "-1"], "--lr"),
        (["--root", str(tmp_path / "missing")], "--root"),
    ]
    for argv, name in cases:
        assert main(argv + ["--out", str(tmp_path / "r"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and name in err and "Traceback" not in err, err


def test_labels_outside_class_range_are_refused():
    labels = torch.zeros(2, 4, 4, dtype=torch.uint8)
    labels[1, 2, 3] = 9
    data = SegData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels, torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
                   torch.full((1, 4, 4), 255, dtype=torch.uint8), num_classes=8, class_names=tuple("abcdefgh"))
    with pytest.raises(DataError, match="image 1 holds label 9"):
        data.validate("toy")
    labels[1, 2, 3] = 255  # the ignore index is fine
    data.validate("toy")


def test_cli_trains_and_prints_miou(tmp_path, capsys):
    argv = ["--method", "supervised", "--iters", "2", "--num-train", "16", "--num-val", "4", "--image-size", "32",
            "--crop", "32", "--batch-size", "2", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
            "--no-progress", "--log-backend", "csv"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out
    # resuming a finished run evaluates and exits
    assert main(argv + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "ipixmatch", "u2pl", "ctt", "mllc"])
def test_method_losses_capture_in_one_graph(tmp_path, method):
    # fullgraph=True fails on any graph break; aot_eager checks capture and autograd without
    # paying for inductor code generation on the CPU
    trainer = Trainer(tiny(tmp_path, method=method, iters=2, u2pl_sup_only=0.0), echo=lambda *a: None)
    eager = trainer._losses
    torch._dynamo.reset()
    trainer._losses = torch.compile(eager, fullgraph=True, backend="aot_eager")
    out = trainer.train_step()
    assert torch.isfinite(out["loss"]).item()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "ipixmatch", "u2pl", "ctt", "mllc"])
def test_cuda_step_never_syncs_and_compiles(tmp_path, method):
    # u2pl, ctt, mllc: fused entropy/percentile/rank/contrast/graph ops and sync-free banks
    cfg = tiny(tmp_path, method=method, iters=6, device="cuda", compile="off", u2pl_sup_only=0.0)
    trainer = Trainer(cfg, echo=lambda *a: None)
    trainer.train_step()  # warm-up: allocator, cuDNN/cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    compiled = Trainer(tiny(tmp_path, method=method, iters=4, device="cuda", compile="on", out=str(tmp_path / "c")),
                       echo=lambda *a: None)
    metrics = compiled.train()
    assert metrics is not None and metrics.miou == metrics.miou  # finite, bf16 autocast + compile ran


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["u2pl", "ctt", "mllc"])
def test_bank_and_graph_methods_train_on_cuda_with_compile(tmp_path, method):
    # device placement, bf16 autocast and capture of the three bank/graph methods
    cfg = tiny(tmp_path, method=method, iters=4, device="cuda", compile="on", u2pl_sup_only=0.0)
    metrics = Trainer(cfg, echo=lambda *a: None).train()
    assert metrics is not None and metrics.miou == metrics.miou


@pytest.mark.parametrize("method", ["fixmatch", "mllc"])
def test_hidden_labels_of_unlabeled_images_never_reach_a_loss(tmp_path, method, monkeypatch):
    """The diagnostics score pseudo-labels with the labels of unlabeled images: replacing those labels
    by noise must leave training bit for bit as it was and change only the diagnostics."""
    from semiseg_fast.data import build_dataset
    from semiseg_fast.data.splits import parse_labeled
    from semiseg_fast.engine import trainer as trainer_module

    def scrambled(cfg):
        data = build_dataset(cfg)
        _, unlabeled = data.split(parse_labeled(cfg.labeled), cfg.data_seed)
        labels = data.train_labels.clone()
        noise = torch.randint(0, data.num_classes, labels[unlabeled].shape, generator=torch.Generator().manual_seed(0))
        labels[unlabeled] = noise.to(labels.dtype)
        data.train_labels = labels
        return data

    results = []
    for name, loader in (("plain", build_dataset), ("scrambled", scrambled)):
        monkeypatch.setattr(trainer_module, "build_dataset", loader)
        cfg = tiny(tmp_path, method=method, iters=4, eval_every=2, deterministic=True, out=str(tmp_path / name))
        t = Trainer(cfg)
        t.train()
        results.append((t.method.state_dict(), _logged(tmp_path / name, "diag/pl_acc"),
                        _logged(tmp_path / name, "train/loss")))
    (state_a, diag_a, loss_a), (state_b, diag_b, loss_b) = results
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert loss_a == loss_b
    assert len(diag_a) == 2 and diag_a != diag_b  # the diagnostics did read them


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "ipixmatch", "u2pl", "ctt", "mllc"])
def test_every_method_logs_diagnostics_and_its_switch(tmp_path, method, capsys):
    cfg = tiny(tmp_path, method=method, iters=2, eval_every=2, log_every=1, batch_size=2)
    t = Trainer(cfg)
    t.train()
    with open(tmp_path / "run" / "metrics.csv") as f:
        tags = {r["tag"]: float(r["value"]) for r in csv.DictReader(f)}
    for name in ("pl_acc", "pl_acc_objects", "confident_share", "confident_share_objects", "confident_acc"):
        assert 0.0 <= tags[f"diag/{name}"] <= 1.0, name
    switches = type(t.method).SWITCHES
    for key in switches:
        assert 0.0 <= tags[f"switch/{key}"] <= 1.0
        if tags[f"switch/{key}"] == 0:  # never on in 2 iterations: said at the end, not silently
            assert f"{switches[key]} never switched on" in capsys.readouterr().out
    if method == "mllc":
        assert {"diag/before_graph_acc", "diag/graph_kept", "diag/graph_degree"} <= tags.keys()
    if method == "unimatch":
        assert 0.0 <= tags["train/fp_agree"] <= 1.0
    if method in ("u2pl", "ctt"):
        assert 0.0 <= tags["train/bank_fill"] <= 1.0
