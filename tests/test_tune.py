"""The kernel configuration sweep (profiling/tune.py)."""
import csv

import torch


def test_tune_checks_every_candidate_times_it_and_restores_the_entry(tmp_path, monkeypatch):
    import sys
    import types

    from profiling import bench_ops, tune

    kernel = types.ModuleType("fake_kernel")
    kernel.TILES = {"TILE": 2, "OTHER": 7}  # shipped; TILE = 3 stands for a configuration computing something else
    monkeypatch.setitem(sys.modules, "fake_kernel", kernel)
    x = torch.arange(4.0)

    def build(shape, dtype, device):
        assert kernel.TILES["OTHER"] == 7  # one entry at a time
        scale = 2.5 if kernel.TILES["TILE"] == 3 else 2.0
        xg = x.clone().requires_grad_(True)

        def fwd_bwd():
            (xg * scale).sum().backward()

        fwd_bwd.gradient = lambda: torch.autograd.grad((xg * scale).sum(), xg)[0]
        return {"fused": {"fwd": lambda: x * scale, "fwd+bwd": fwd_bwd}}, {}

    monkeypatch.setitem(bench_ops.OPS, "fake", (lambda smoke: [("tiny", None)], build))
    monkeypatch.setitem(tune.KNOBS, "fake", [tune.Knob("fake_kernel", "TILES", "TILE", (1, 3, 4), (1, 3))])
    out = tmp_path / "tune.csv"
    rows = tune.run(["fake"], ["fp32"], True, torch.device("cpu"), out, echo=lambda *a: None)
    assert [(r["provider"], r["mode"], r["note"]) for r in rows] == [
        ("fused[tile=2]", "fwd+bwd", "shipped"), ("fused[tile=1]", "fwd+bwd", ""),
        ("fused[tile=3]", "fwd+bwd", "disagrees with the shipped configuration: not timed")]
    assert float(rows[0]["ms_median"]) > 0 and float(rows[1]["ms_median"]) > 0 and "ms_median" not in rows[2]
    assert kernel.TILES == {"TILE": 2, "OTHER": 7}
    # a key picked per dtype is labelled by its table
    per_dtype = tune.Knob("fake_kernel", "TILES", lambda dtype: "OTHER", (8,), (8,))
    assert per_dtype.name == "tiles" and per_dtype.shipped(torch.float32) == 7
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == 3
    # the agreement rule: exact for the percentile op, relative to the largest value otherwise
    assert tune.agree([torch.tensor([1.0, 100.0])], [torch.tensor([1.05, 100.0])], 1e-3)
    assert not tune.agree([torch.tensor([1.0, 100.0])], [torch.tensor([1.2, 100.0])], 1e-3)
    assert not tune.agree([torch.tensor([1.0])], [torch.tensor([1.0 + 1e-7])], None)
    assert not tune.agree([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, 2.0])], 1e-3)


def test_tune_smoke_on_a_real_kernel(tmp_path):
    from semiseg_fast.kernels import spatial_kl

    from profiling import tune

    shipped = spatial_kl.TILES["BLOCK_J"]
    rows = tune.run(["spatial_kl"], ["fp32"], True, torch.device("cpu"), tmp_path / "t.csv", echo=lambda *a: None)
    assert [r["provider"] for r in rows][0] == f"fused[block_j={shipped}]" and rows[0]["note"] == "shipped"
    assert len(rows) == 2 and all(float(r["ms_median"]) > 0 for r in rows)
    assert spatial_kl.TILES["BLOCK_J"] == shipped
