"""Engine building blocks: EMA, schedule, confusion matrix, atomic checkpoints, streams, NVTX."""
import math

import pytest
import torch
from torch import nn

from semiseg_fast.data.streams import IndexStream
from semiseg_fast.engine import ConfusionMatrix, atomic_save, load_checkpoint, poly_factor
from semiseg_fast.engine.evaluate import SegMetrics
from semiseg_fast.errors import CheckpointError
from semiseg_fast.methods.ema import EMA, ema_decay
from semiseg_fast.nvtx import nvtx_range


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_ema_matches_formula_and_copies_int_buffers():
    student, teacher = _net(), _net()
    student(torch.randn(2, 3, 8, 8))  # moves BN running stats and num_batches_tracked
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    EMA(student, teacher).update(0.9)
    s = student.state_dict()
    for k, t in teacher.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(t, 0.9 * before[k] + 0.1 * s[k], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(t, s[k]), k
    assert all(not p.requires_grad for p in teacher.parameters())


def test_ema_decay_zero_copies_and_ramp():
    student, teacher = _net(), _net()
    EMA(student, teacher).update(ema_decay(0))
    for a, b in zip(student.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == 0.5
    assert ema_decay(10_000) == 0.99
    assert ema_decay(3, start=5) == 0.0
    with pytest.raises(ValueError, match="decay"):
        EMA(student, teacher).update(1.5)


def test_poly_factor():
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(100, 100) == 0.0
    assert math.isclose(poly_factor(50, 100, 0.9), 0.5 ** 0.9)
    with pytest.raises(ValueError, match="total"):
        poly_factor(0, 0)


def test_confusion_matrix_against_hand_count():
    # 3 classes; one ignored pixel; hand-built confusion matrix (rows truth, columns prediction)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.mat, expected)
    m = cm.summary()
    # IoU_c = tp / (row + col - tp): 1/(2+3-1), 2/(3+3-2), 1/(2+1-1)
    assert m.iou == pytest.approx([1 / 4, 2 / 4, 1 / 2])
    assert m.miou == pytest.approx((1 / 4 + 2 / 4 + 1 / 2) / 3)
    assert m.pixel_acc == pytest.approx(4 / 7)


def test_absent_class_is_nan_and_excluded_from_mean():
    m = SegMetrics.from_confusion(torch.tensor([[3, 0, 0], [0, 0, 0], [1, 0, 2]]))
    assert math.isnan(m.iou[1])
    assert m.miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert "mIoU" in m.table(["bg", "a", "b"])


def test_confusion_matrix_shape_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 2), torch.zeros(2, 3))


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temp file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no checkpoint there"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: not a checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def test_index_stream_epochs_and_resume():
    idx = torch.arange(10, 20)
    a = IndexStream(idx, batch_size=4, seed=3)
    draws = [a.next() for _ in range(5)]  # 20 indices = two epochs
    assert sorted(torch.cat(draws[:2] + [draws[2][:2]]).tolist()) == list(range(10, 20))
    b = IndexStream(idx, batch_size=4, seed=3)
    for _ in range(3):
        b.next()
    c = IndexStream(idx, batch_size=4, seed=3)
    c.load_state_dict(b.state_dict())
    for d in draws[3:]:
        assert torch.equal(c.next(), d)
    assert not torch.equal(IndexStream(idx, 10, seed=4).next(), IndexStream(idx, 10, seed=3).next())
    with pytest.raises(ValueError, match="no indices"):
        IndexStream(torch.arange(0), 2, 0)


def test_nvtx_range_is_harmless_without_gpu():
    with nvtx_range("phase"):
        x = torch.ones(2) * 2
    assert x.sum() == 4
