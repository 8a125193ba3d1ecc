"""profile_step writes a Chrome trace, an operator table and per-phase times."""
import csv
import json

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
