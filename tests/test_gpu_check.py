"""profiling.gpu_check --dry-run: the lent GPU's one command runs its whole plan on CPU at toy sizes."""
import csv

from profiling import gpu_check


def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    with (tmp_path / "gpu_check.csv").open() as fh:
        stages = list(csv.DictReader(fh))
    names = [s["stage"] for s in stages]
    assert names[0] == "tests" and "steps/u2pl" in names and "steps/unimatch" in names
    assert {f"ops/{op}" for op in gpu_check.bench_ops.OPS} <= set(names)
    assert all(s["status"] == "passed" for s in stages), stages
    with (tmp_path / "bench.csv").open() as fh:
        providers = {r["provider"] for r in csv.DictReader(fh)}
    assert providers == {"fused", "reference"}
    assert "| steps/u2pl | passed |" in (tmp_path / "report.md").read_text()
