"""Fault injection: kills, bad checkpoints, full disks, NaN steps, reused run directories.

Each fault must end in one line naming the cause (exit 2 for a bad command line, 1 at run time)
and lose nothing that was saved before it.
"""
import csv
import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from semiseg_fast import fileio
from semiseg_fast.cli import main
from semiseg_fast.config import TrainConfig
from semiseg_fast.engine.checkpoint import load_checkpoint
from semiseg_fast.engine.trainer import MAX_SKIPPED_IN_A_ROW, Interrupted, Trainer
from semiseg_fast.errors import CheckpointError, ConfigError, NonFiniteLossError

REPO = Path(__file__).resolve().parent.parent
TINY = dict(num_train=32, num_val=8, image_size=32, crop=24, batch_size=2, iters=6, eval_every=0, ckpt_every=0,
            log_every=2, progress=False, log_backend="csv", labeled="1/4", eval_batch_size=8, deterministic=True)


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / name), **kw})


def argv(tmp_path, *extra, name="run"):
    flags = []
    for key, value in {**TINY, "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / name)}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags + list(extra)


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    return err


def weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.method.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_at_a_random_step_then_resume_equals_one_run(tmp_path):
    full = Trainer(tiny(tmp_path, "full", method="fixmatch"), echo=lambda *a: None)
    full.train()
    stop_at = random.Random(os.getpid()).randint(1, TINY["iters"] - 1)
    cut = Trainer(tiny(tmp_path, "cut", method="fixmatch"), echo=lambda *a: None)
    clean = cut._losses

    def killed(batch, progress):
        if cut.step == stop_at - 1:  # SIGTERM arrives inside iteration stop_at
            os.kill(os.getpid(), signal.SIGTERM)
        return clean(batch, progress)

    cut._losses = killed
    with pytest.raises(Interrupted):
        cut.train()
    assert load_checkpoint(tmp_path / "cut" / "latest.pt")["step"] == stop_at, stop_at
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    resumed = Trainer(tiny(tmp_path, "cut", method="fixmatch", resume=True), echo=lambda *a: None)
    resumed.train()
    assert_same(weights(full), weights(resumed))
    with open(tmp_path / "cut" / "metrics.csv") as f:
        rows = [(r["step"], r["tag"]) for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)), "a resumed run repeats metrics rows"
    assert not list((tmp_path / "cut").glob("*.tmp")) and not list((tmp_path / "cut").glob(".*.tmp"))


def test_sigkill_mid_run_then_resume_equals_one_run(tmp_path):
    """A real kill (no handler runs): the run resumes from its last checkpoint and ends identical."""
    flags = argv(tmp_path, "--method", "supervised", "--ckpt-every", "1", "--iters", "5", name="killed")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "killed" / "latest.pt"
    try:
        while not latest.exists() and proc.poll() is None:  # killed after its first checkpoint
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    (tmp_path / "killed" / f".latest.pt.{os.getpid()}.tmp").write_bytes(b"half a write")  # as a kill mid-save leaves
    resumed = Trainer(tiny(tmp_path, "killed", method="supervised", iters=5, ckpt_every=1, resume=True),
                      echo=lambda *a: None)
    assert resumed.step >= 1
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # cleared at start
    resumed.train()
    full = Trainer(tiny(tmp_path, "full", method="supervised", iters=5), echo=lambda *a: None)
    full.train()
    assert_same(weights(full), weights(resumed))


@pytest.mark.parametrize("damage", ["truncated", "empty", "pickled callable", "wrong architecture", "best.pt"])
def test_bad_checkpoints_give_one_line(tmp_path, capsys, damage):
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2")) == 0
    latest = tmp_path / "run" / "latest.pt"
    extra = ["--resume"]
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
        needle = "truncated or not a checkpoint"
    elif damage == "empty":
        latest.write_bytes(b"")
        needle = "empty"
    elif damage == "pickled callable":
        with open(latest, "wb") as f:
            pickle.dump({"step": os.system}, f, protocol=2)  # loading it unsafely would hand out a callable
        needle = "could run code"
    elif damage == "wrong architecture":
        state = load_checkpoint(latest)
        state["method"] = {k: v for k, v in state["method"].items() if "classifier" not in k}
        torch.save(state, latest)
        needle = "does not fit this supervised model"
    else:
        latest.write_bytes((tmp_path / "run" / "best.pt").read_bytes())
        needle = "not a resumable checkpoint"
    capsys.readouterr()
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2", *extra)) == 1
    assert str(latest) in one_line_error(capsys, needle)


def test_a_pickled_callable_is_refused_by_the_loader(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": os.system}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to load.*could run code"):
        load_checkpoint(path)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2")) == 0
    latest = tmp_path / "run" / "latest.pt"
    before = latest.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", "?")))

    monkeypatch.setattr(fileio.torch, "save", full_disk)
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "4", "--change-schedule", "--resume")) == 1
    err = one_line_error(capsys, "No space left on device")
    assert str(tmp_path / "run") in err  # the file that could not be written
    assert latest.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")) == []


def test_unwritable_run_directory_is_one_line(tmp_path, monkeypatch, capsys):
    real = fileio.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path / "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2")) == 1
    one_line_error(capsys, "Permission denied")


def test_one_nan_step_is_skipped_and_never_reaches_the_weights(tmp_path):
    clean_run = Trainer(tiny(tmp_path, "clean", method="supervised", iters=3), echo=lambda *a: None)
    clean_run.train(max_steps=2)  # the same schedule, stopped before the third step
    said = []
    trainer = Trainer(tiny(tmp_path, method="supervised", iters=3), echo=said.append)
    clean = trainer._losses

    def poisoned(batch, progress):
        out = clean(batch, progress)
        if trainer.step == 2:  # the 3rd and last iteration
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer._losses = poisoned
    trainer.train()
    # the weights after the skipped step are those after two good ones (batch-norm statistics included)
    assert_same(weights(clean_run), weights(trainer))
    with open(tmp_path / "run" / "metrics.csv") as f:
        skipped = [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "train/skipped_steps"]
    assert skipped == [0.0, 1.0]
    assert any("skipped 1 iteration(s)" in line and "iteration 3" in line for line in said), said


def test_repeated_nan_steps_stop_with_the_last_checkpoint_intact(tmp_path):
    iters = 2 + MAX_SKIPPED_IN_A_ROW + 2
    trainer = Trainer(tiny(tmp_path, method="supervised", iters=iters, ckpt_every=1, log_every=1),
                      echo=lambda *a: None)
    clean = trainer._losses

    def broken(batch, progress):
        out = clean(batch, progress)
        if trainer.step >= 2:
            out["loss"] = out["loss"] * float("inf")
        return out

    trainer._losses = broken
    with pytest.raises(NonFiniteLossError, match=rf"{MAX_SKIPPED_IN_A_ROW} iterations in a row.*first at iteration 3"):
        trainer.train()
    state = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_run_directory_rules(tmp_path, capsys):
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2")) == 0
    capsys.readouterr()
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2")) == 2  # a second run into the same --out
    one_line_error(capsys, "already holds a run")
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "3", "--resume")) == 2  # a changed schedule
    one_line_error(capsys, "--iters: checkpoint")
    assert main(argv(tmp_path, "--method", "supervised", "--iters", "2", "--overwrite")) == 0
    with open(tmp_path / "run" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]
    assert steps == [2]  # one run's rows, not two runs mixed
    capsys.readouterr()
    assert main(argv(tmp_path, "--method", "supervised", "--resume", name="fresh")) == 2
    one_line_error(capsys, "--resume: no checkpoint")
    with pytest.raises(ConfigError, match="--overwrite"):
        tiny(tmp_path, resume=True, overwrite=True).validate()


@pytest.mark.parametrize("flags, needle", [
    (["--labeled", "513"], "--labeled"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--conf-thresh", "nan"], "--conf-thresh"),
    (["--ipix-temperature", "-inf"], "--ipix-temperature"),
])
def test_bad_values_are_usage_errors(tmp_path, capsys, flags, needle):
    code = None
    try:
        code = main(argv(tmp_path, *flags) + ["--num-train", "512"])
    except SystemExit as e:  # argparse's own usage error
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("content", [None, b"", b"junk", "foreign"])
def test_bad_pretrained_files_name_the_argument(tmp_path, capsys, content):
    path = tmp_path / "weights.pt"
    if content == "foreign":
        torch.save({"conv1.weight": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    assert main(argv(tmp_path, "--method", "supervised", "--pretrained", str(path))) == 2
    assert str(path) in one_line_error(capsys, "--pretrained: ")
