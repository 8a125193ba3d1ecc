"""The benchmarks' harness (profiling/harness.py): the stamp, the CSV rows and the timers on CPU."""
import csv
import datetime

import pytest
import torch

from profiling import harness

CPU = torch.device("cpu")


def test_stamp_carries_date_commit_versions_and_the_device():
    env = harness.stamp(CPU)
    assert set(env) == {"date", "commit", "torch", "triton", "device"}
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["commit"]
    assert datetime.date.fromisoformat(env["date"]) == datetime.date.today()
    assert set(harness.stamp()) == {"date", "commit", "torch", "triton"}
    precise = harness.stamp(timestamp=True)["date"]  # gpu_check's reports: to the second
    assert datetime.datetime.fromisoformat(precise).date() == datetime.date.today() and "T" in precise
    assert harness.results_path(CPU) == harness.RESULTS / "cpu.csv"


def test_append_rows_writes_one_header_and_refuses_a_csv_of_other_columns(tmp_path):
    out = tmp_path / "new" / "r.csv"
    harness.append_rows(out, [{"op": "a", "ms_median": "1.0"}])
    harness.append_rows(out, [{"op": "b", "note": "x"}])
    with out.open(newline="") as f:
        assert next(csv.reader(f)) == harness.FIELDS
    assert [(r["op"], r["note"]) for r in harness.read_rows(out)] == [("a", ""), ("b", "x")]
    old = tmp_path / "old.csv"
    old.write_text("date,op\n2026-01-01,x\n")
    with pytest.raises(ValueError, match="columns"):
        harness.append_rows(old, [{"op": "a"}])
    assert old.read_text() == "date,op\n2026-01-01,x\n"


def test_write_rows_replaces_the_file_and_drops_other_keys(tmp_path):
    path = tmp_path / "t.csv"
    harness.write_rows(path, ["a", "b"], [{"a": 1, "b": 2, "c": 3}])
    harness.write_rows(path, ["a", "b"], [{"a": 4, "b": 5}])
    assert harness.read_rows(path) == [{"a": "4", "b": "5"}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_timers_give_ordered_quantiles_on_cpu():
    x = torch.randn(256, 256)
    med, p20, p80 = harness.time_op(lambda: x @ x, CPU)
    assert 0 < p20 <= med <= p80
    calls = []
    ms = harness.time_calls(lambda: calls.append(1), 4, CPU, synchronise=True)
    assert len(ms) == 4 == len(calls) and all(t >= 0 for t in ms)
    assert harness.quantiles([3.0, 1.0, 2.0, 5.0, 4.0, 6.0]) == pytest.approx((3.5, 2.0, 5.0))
    assert harness.quantiles([2.0]) == (2.0, 2.0, 2.0)


def test_memory_and_syncs_are_not_measured_off_cuda():
    with harness.peak_memory(CPU) as peak, harness.counting_host_syncs(CPU) as syncs:
        torch.ones(10).sum().item()
    assert peak.mb is None and syncs.value is None
