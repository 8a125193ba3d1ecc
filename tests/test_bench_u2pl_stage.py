"""The U2PL stage benchmark's two providers compute the same loss and gradient (tiny sizes, CPU)."""
import csv

import torch

from profiling import bench_u2pl_stage as stage
from profiling.harness import FIELDS

SMOKE = stage.SIZES["smoke"]


def test_full_queues_wrap_and_providers_agree():
    # full queues: this step's keys wrap every ring, so the draws map through (ptr + j) mod cap
    inp = stage.make_inputs(SMOKE, torch.device("cpu"), seed=3)
    loss_o, loss_e, grad_rel = stage.compare(inp, SMOKE, stage.initial_queues(SMOKE))
    assert loss_o > 0
    # fp32 both: the same 51-term log-sum-exps summed in other orders differ by ~1e-7 relative
    assert abs(loss_o - loss_e) <= 1e-5 * loss_o and grad_rel <= 1e-5


def test_partial_and_empty_queues_agree():
    # no key is offered this step (no high-entropy pixel), so class 0 keeps an empty queue (it
    # counts in |V| but adds nothing), classes 1 and 3 are partial (slot j = age j) and 2 is full
    inp = stage.make_inputs(SMOKE, torch.device("cpu"), seed=4)
    inp["high"] = torch.zeros_like(inp["high"])
    queues = stage.initial_queues(SMOKE, fill=[0, 3, 30, 10, 29])
    loss_o, loss_e, grad_rel = stage.compare(inp, SMOKE, queues)
    assert loss_o > 0 and abs(loss_o - loss_e) <= 1e-5 * loss_o and grad_rel <= 1e-5
    assert [q.shape[0] for q in queues] == [0, 3, 30, 10, 29]  # compare leaves the state alone


def test_single_valid_class_gives_zero_in_both():
    inp = stage.make_inputs(SMOKE, torch.device("cpu"), seed=5)
    inp["labels"] = torch.full_like(inp["labels"], 2)
    loss_o, loss_e, grad_rel = stage.compare(inp, SMOKE, stage.initial_queues(SMOKE))
    assert loss_o == 0 and loss_e == 0 and grad_rel == 0


def test_official_queues_keep_the_last_cap_keys():
    inp = stage.make_inputs(SMOKE, torch.device("cpu"), seed=6)
    queues = stage.initial_queues(SMOKE, fill=[1, 0, 0, 0, 0])
    first = queues[0].clone()
    stage.official_stage(inp, queues, SMOKE)
    assert all(q.shape[0] <= cap for q, cap in zip(queues, SMOKE.caps))
    assert any(q.shape[0] > 0 for q in queues[1:])
    if queues[0].shape[0] < SMOKE.caps[0]:
        assert torch.equal(queues[0][0], first[0])  # oldest first, as the official list


def test_smoke_run_appends_rows(tmp_path):
    out = tmp_path / "cpu.csv"
    rows = stage.run("smoke", torch.device("cpu"), steps=2, out=out, echo=lambda *_: None)
    assert [r["provider"] for r in rows] == ["fused", "official"]
    with out.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == FIELDS and len(read) == 2
    assert all(r["op"] == "u2pl_contrast_stage" and r["host_syncs"] == "" for r in read)
    assert float(read[0]["ms_median"]) > 0
