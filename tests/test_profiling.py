"""profile_step writes a Chrome trace, an operator table and per-phase times."""
import json

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
