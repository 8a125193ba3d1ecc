"""The profiling suite: profile_step's trace and phase table, the op and step benchmarks' CSV rows,
the report (targets, tables, plots, README block) and the one-command run_all, at smoke sizes."""
import csv
import json

import pytest
import torch

from profiling.profile_step import main


def test_profile_step_writes_trace_and_phase_table(tmp_path, capsys):
    out = tmp_path / "prof"
    argv = ["--method", "fixmatch", "--steps", "2", "--warmup", "1", "--num-train", "16", "--num-val", "4",
            "--image-size", "32", "--crop", "32", "--batch-size", "2", "--labeled", "4",
            "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out)]
    assert main(argv) == 0
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"phase/step", "phase/teacher", "phase/student", "phase/backward", "phase/optimizer", "phase/ema"} <= names
    phases = (out / "phases.txt").read_text()
    for phase in ("step", "augment", "teacher", "student", "loss", "backward", "optimizer", "ema"):
        assert f"\n{phase} " in "\n" + phases, phases
    assert "aten::" in (out / "top_ops.txt").read_text()
    assert "phase" in capsys.readouterr().out


def test_op_benchmark_smoke_writes_csv_rows(tmp_path):
    from profiling import bench_ops

    out = tmp_path / "cpu.csv"
    rows = bench_ops.run(["spatial_kl", "entropy_percentile", "sampled_contrast", "class_bank_contrast"], ["fp32"], smoke=True, device=torch.device("cpu"),
                         out=out, echo=lambda *a: None)
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == {
        ("spatial_kl", p, m) for p in ("fused", "reference", "compiled") for m in ("fwd", "bwd", "fwd+bwd")} | {
        ("entropy_percentile", p, "fwd") for p in ("fused", "reference", "official")} | {
        (op, p, m) for op in ("sampled_contrast", "class_bank_contrast") for p in ("fused", "reference")
        for m in ("fwd", "bwd", "fwd+bwd")}
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == 24 and float(written[-1]["matmul_tflop_s"]) > 0 and written[-1]["tflop_s"] and all(float(r["ms_median"]) > 0 for r in written)
    assert written[0]["commit"] and written[0]["torch"] == torch.__version__


# -- the suite: report, step benchmark, one command -------------------------------------------------

def _row(op, case, provider, mode, ms, **extra):
    from profiling.harness import FIELDS

    row = dict.fromkeys(FIELDS, "")
    row.update(date="2026-11-21", commit="abc1234", device="cpu", torch="t", triton="tr", op=op, case=case,
               dtype="fp32", provider=provider, mode=mode, ms_median=str(ms))
    row.update({k: str(v) for k, v in extra.items()})
    return row


def _write(path, rows):
    from profiling.harness import append_rows

    append_rows(path, rows)
    return path


def test_report_targets_speedups_and_newest_rows(tmp_path):
    from profiling import report

    rows = [
        _row("spatial_kl", "vit", "fused", "fwd+bwd", 99.0, pct_of_copy=10.0),  # replaced below
        _row("spatial_kl", "vit", "fused", "fwd+bwd", 2.0, pct_of_copy=60.0),
        _row("spatial_kl", "vit", "reference", "fwd+bwd", 10.0),  # 5x: meets >= 4x
        _row("spatial_kl", "vit", "compiled", "fwd+bwd", 3.0),  # 1.5x: misses >= 2x
        _row("supervised", "32px", "fused", "step", 10.0, peak_mb=50, host_syncs=0, graph_breaks=0),
        _row("supervised", "32px", "reference", "step", 20.0, peak_mb=100),
        _row("u2pl", "32px", "fused", "step", 10.0, peak_mb=90, host_syncs=2, graph_breaks=1),
        _row("u2pl", "32px", "reference", "step", 12.0, peak_mb=100),
    ]
    rows = report.load(_write(tmp_path / "r.csv", rows))
    assert len(rows) == 7  # the first fused spatial_kl row is superseded by the newer one
    verdicts = {t.text: (v, d) for t, v, d in report.check_targets(rows)}
    assert verdicts["spatial KL fwd+bwd within 2x of the bytes floor"][0] == "met"  # 60 % >= 50 %
    assert verdicts["spatial KL >= 4x the eager reference"][0] == "met"
    assert verdicts["spatial KL >= 2x the compiled reference"] == ("missed", "worst 1.5 (spatial_kl vit fp32)")
    # the worst method decides: u2pl 1.2x, 0.9x the memory, 2 syncs, 1 break
    assert verdicts["every method's step >= 1.5x faster with fused ops"] == ("missed", "worst 1.2 (u2pl 32px fp32)")
    assert verdicts["every method's step <= 0.6x the peak memory"] == ("missed", "worst 0.9 (u2pl 32px fp32)")
    assert verdicts["zero host syncs in the step"][0] == "missed"
    assert verdicts["zero graph breaks"][0] == "missed"
    assert verdicts["MLLC graph fwd+bwd >= 50x the official-style layer at VOC"][0] == "not measured"
    text = report.markdown(rows)
    assert "| spatial_kl | vit | fp32 | fwd+bwd | 2 | reference 10 (5x), compiled 3 (1.5x) | 60.0% copy |" in text
    assert "| supervised | 32px | 10 | 20 | 2x | 50 / 100 | 0 | 0 |" in text


def test_report_rewrites_only_the_readme_block_and_draws_plots(tmp_path):
    from profiling import report

    csv_path = _write(tmp_path / "dev.csv", [_row("spatial_kl", "a", "fused", "fwd", 1.0),
                                               _row("spatial_kl", "a", "reference", "fwd", 4.0),
                                               _row("fixmatch", "b", "fused", "step", 5.0),
                                               _row("fixmatch", "b", "reference", "step", 6.0)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n{report.BEGIN}\nold table\n{report.END}\ntail\n")
    assert report.main([str(csv_path), "--readme", str(readme), "--plots"]) == 0
    body = readme.read_text()
    assert body.startswith("# head\n") and body.endswith(f"{report.END}\ntail\n") and "old table" not in body
    assert "commit abc1234" in body and "![dev_ops](dev_ops.png)" in body
    for name in ("dev_ops.png", "dev_steps.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match="readme"):
        report.update_readme(bare, "x")
    with pytest.raises(FileNotFoundError, match="csv"):
        report.load(tmp_path / "missing.csv")


def test_fill_banks_fills_every_class_memory_bank():
    from profiling.bench_steps import fill_banks
    from semiseg_fast.methods.bank import ClassMemoryBank

    holder = torch.nn.ModuleList([ClassMemoryBank(3, 4, [5, 2, 7]), ClassMemoryBank(2, 4, 3)])
    assert fill_banks(holder, torch.Generator().manual_seed(0)) == 2
    for bank in holder:
        assert bool(bank.is_full())
        assert torch.allclose(bank.keys()[bank.valid_mask()].norm(dim=-1), torch.ones(1))


def test_step_benchmark_smoke_rows(tmp_path):
    from profiling import bench_steps

    out = tmp_path / "cpu.csv"
    rows = bench_steps.run(["supervised", "fixmatch"], bench_steps.SMOKE_SIZE, torch.device("cpu"), out,
                           steps=2, warmup=1, compile_mode="off", smoke=True, echo=lambda *a: None)
    assert [(r["op"], r["provider"]) for r in rows] == [
        ("supervised", "fused"), ("supervised", "reference"), ("fixmatch", "fused"), ("fixmatch", "reference")]
    for r in rows:
        assert r["mode"] == "step" and float(r["ms_median"]) > 0 and r["host_syncs"] == "" and r["peak_mb"] == ""
    # images/s = images per step / median seconds: 2 labeled (+ 2 unlabeled for fixmatch)
    assert float(rows[0]["images_s"]) == pytest.approx(2 / (float(rows[0]["ms_median"]) * 1e-3), rel=1e-3)
    assert float(rows[2]["images_s"]) == pytest.approx(4 / (float(rows[2]["ms_median"]) * 1e-3), rel=1e-3)
    assert rows[0]["graph_breaks"] == "0" and rows[2]["graph_breaks"] == "0"  # counted on the fused rows
    assert len(list(csv.DictReader(out.open()))) == 4


def test_run_all_smoke_writes_rows_plots_and_readme(tmp_path):
    from profiling import run_all
    from profiling.report import BEGIN, END

    out, readme = tmp_path / "cpu.csv", tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    run_all.run(torch.device("cpu"), out, smoke=True, readme=readme, plots=True, compile_steps=False,
                methods=["supervised"], op_names=["spatial_kl"], echo=lambda *a: None)
    written = list(csv.DictReader(out.open()))
    kinds = {(r["op"], r["provider"]) for r in written}
    assert {("ceiling", "torch"), ("spatial_kl", "fused"), ("spatial_kl", "compiled"),
            ("supervised", "fused"), ("supervised", "reference")} <= kinds
    assert {r["case"] for r in written if r["op"] == "ceiling"} == {
        "copy bandwidth (read + write)", "matmul fp32", "matmul tf32", "matmul bf16"}
    assert (tmp_path / "cpu_ops.png").is_file() and (tmp_path / "cpu_steps.png").is_file()
    assert "| supervised |" in readme.read_text() and "| 8 | zero graph breaks |" in readme.read_text()


@pytest.mark.gpu
def test_step_benchmark_counts_host_syncs_on_cuda(tmp_path):
    """The sync counter counts: a step with one planted ``.item()`` reads one sync (per step)."""
    from profiling import bench_steps
    from semiseg_fast.engine.trainer import Trainer

    cfg = bench_steps.step_config("supervised", bench_steps.SMOKE_SIZE, torch.device("cuda"), str(tmp_path), "off",
                                  smoke=True)
    trainer = Trainer(cfg, echo=lambda *a: None)
    trainer.train_step()
    ms, syncs = bench_steps.time_steps(trainer, 3)
    assert len(ms) == 3 and all(t > 0 for t in ms) and syncs == 0
    step = trainer.train_step
    trainer.train_step = lambda: step()["loss"].item()
    assert bench_steps.time_steps(trainer, 3)[1] == 1


def test_compiled_reference_providers_run(monkeypatch):
    """The compiled-reference providers that only CUDA runs time (compiling is slow on this CPU)
    build and run, and agree with the eager reference."""
    from profiling import bench_ops

    monkeypatch.setattr(bench_ops, "COMPILED_ON_CPU", True)
    cpu = torch.device("cpu")
    for op in ("entropy_percentile", "sampled_contrast", "class_bank_contrast"):
        cases, build = bench_ops.OPS[op]
        providers, _ = build(cases(True)[0][1], torch.float32, cpu)
        fwd = {name: modes["fwd"]() for name, modes in providers.items() if name in ("reference", "compiled")}
        assert set(fwd) == {"reference", "compiled"}, op
        ref_out, compiled_out = (v[-1] if isinstance(v, tuple) else v for v in fwd.values())
        torch.testing.assert_close(compiled_out.float(), ref_out.float(), rtol=1e-4, atol=1e-5, msg=op)


def test_skipped_providers_are_recorded_with_their_reason(tmp_path, monkeypatch):
    from profiling import bench_ops, report

    def build(shape, dtype, device):
        x = torch.ones(4)
        return {"fused": {"fwd": lambda: x * 2}, "official": "skipped: too big"}, {"fwd": x.numel() * 4}

    monkeypatch.setitem(bench_ops.OPS, "fake", (lambda smoke: [("tiny", None)], build))
    out = tmp_path / "r.csv"
    rows = bench_ops.run(["fake"], ["fp32"], True, torch.device("cpu"), out, echo=lambda *a: None)
    assert [(r["provider"], r["mode"], r.get("note", "")) for r in rows] == [
        ("fused", "fwd", ""), ("official", "fwd", "skipped: too big")]
    assert rows[1].get("ms_median") is None and float(rows[0]["ms_median"]) > 0
    assert "| fake | tiny | fp32 | fwd |" in report.markdown(report.load(out))
    assert "official skipped: too big" in report.markdown(report.load(out))
