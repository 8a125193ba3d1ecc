"""The training engine: data streams, the per-iteration step, evaluation, checkpoints, logging.

The step never waits for the device: metrics accumulate in device tensors and are read (one sync)
every ``log_every`` iterations. A step whose loss or gradients are not finite is skipped on the
device (``optim.FiniteStep``: the weights and momentum stay as they were), counted
(``train/skipped_steps``) and reported at the next read; ``MAX_SKIPPED_IN_A_ROW`` skipped steps in
a row stop the run with ``NonFiniteLossError``, the last checkpoint intact (it only ever holds
finite weights).

The run directory is one run's: a directory that already holds one is refused unless ``resume``
(continue it: same data, model and schedule, ``metrics.csv`` cut back to the checkpoint's
iteration) or ``overwrite`` (start again). SIGTERM and SIGINT stop the loop after the current
iteration and write ``latest.pt``; ``latest.pt`` holds what resume needs, ``best.pt`` the weights of
the best evaluated model and the config only.

Diagnostics (``diag/*`` in ``metrics.csv``, at every evaluation): the labels of up to
``DIAGNOSTIC_IMAGES`` unlabeled training images are held by the trainer, apart from every batch,
and score what the method would teach on them (``Method.pseudo_label_report``): pseudo-label
accuracy on all and on object pixels, the share its confidence rule passes and their accuracy.
``switch/<name>`` is the share of iterations in which the method's extra term was on
(``Method.SWITCHES``); a term that never switched on is reported at the end of the run.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import random
import signal
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data import build_dataset
from ..data.splits import parse_labeled
from ..errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from ..fileio import atomic_write_text
from ..methods import build_method
from ..nvtx import nvtx_range
from .checkpoint import atomic_save, load_checkpoint
from .distributed import convert_sync_batchnorm, init_distributed
from .evaluate import SegMetrics, val_confusion
from .logger import ScalarLogger
from .optim import FiniteStep, build_sgd, poly_factor, set_lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} requested but CUDA is not available")
    return device


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # On CUDA some backward kernels (bilinear up-sampling) have no deterministic version:
        # warn instead of failing there. On CPU every op we use is deterministic.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


MAX_SKIPPED_IN_A_ROW = 5
DIAGNOSTIC_IMAGES = 32
#: files that make a directory hold a run
RUN_FILES = ("latest.pt", "best.pt", "metrics.csv", "config.json")
#: options a resumed run must share with its checkpoint (else it would be another run) ...
SAME_RUN = ("method", "data", "arch", "backbone", "labeled", "data_seed", "num_train", "seed")
#: ... and those that change the schedule, refused unless ``change_schedule``
SCHEDULE = ("iters", "lr", "head_lr_mult", "lr_power", "momentum", "weight_decay", "batch_size",
            "unlabeled_batch_size", "crop")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after ``latest.pt`` was written; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, clean: bool = True) -> None:
    """Apply the run-directory rules (module docstring); with ``clean`` (the writing process) also
    delete an overwritten run and what an interrupted write left."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / "latest.pt").is_file():
            raise ConfigError(f"--resume: no checkpoint {run_dir / 'latest.pt'} to resume from")
    elif held and not overwrite:
        raise ConfigError(f"--out: {run_dir} already holds a run ({', '.join(held)}); pass --resume to continue "
                          "it, --overwrite to start it again, or another --out")
    elif held and clean:
        for name in held:
            (run_dir / name).unlink()
        tb = run_dir / "tb"
        if tb.is_dir():
            for f in sorted(tb.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            tb.rmdir()
    if clean and run_dir.is_dir():
        for stale in run_dir.glob(".*.pt.*.tmp"):  # a write killed before its rename (atomic_save)
            stale.unlink()


def _numpy_rng_state() -> dict:
    # as tensors and plain numbers: a checkpoint must load with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["gauss"]))


def _progress_bar(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; this only guards odd environments
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="it", smoothing=0.1)


class Trainer:
    """One training run of ``cfg`` (a ``semiseg_fast.config.TrainConfig``, which the engine reads
    by attribute and never imports: the config sits above the engine); ``echo`` prints."""

    def __init__(self, cfg, echo=print):
        self.cfg = cfg.validate()
        self.echo = echo
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(cfg.out)
        self.dist.barrier()  # what an earlier run of this process group wrote is complete
        prepare_run_dir(self.run_dir, cfg.resume, cfg.overwrite, clean=self.dist.is_main)
        configure_determinism(cfg.deterministic, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")) else None

        # -- data: the data set hands out resumable, DDP-sharded batch streams --
        self.data = build_dataset(cfg if self.dist.is_main else dataclasses.replace(cfg, progress=False))
        self.num_classes = self.data.num_classes
        try:
            labeled_idx, unlabeled_idx = self.data.split(parse_labeled(cfg.labeled), cfg.data_seed, self.run_dir)
        except (ConfigError, DataError):
            raise
        except ValueError as e:  # a count larger than the training set
            raise ConfigError(f"--labeled: {e}") from None
        self.num_labeled = labeled_idx.numel()

        # -- method, optimizer --
        self.method = build_method(cfg.method, cfg, self.num_classes).to(self.device)
        self.method.num_labeled = self.num_labeled
        self.method.dist = self.dist
        convert_sync_batchnorm(self.method, self.dist, self.device)
        self.method.train()
        stream = partial(self.data.train_stream, crop=cfg.crop, device=self.device, rank=self.dist.rank,
                         world=self.dist.world)
        self.streams = {"labeled": stream(labeled_idx, labeled=True, batch_size=cfg.batch_size, seed=cfg.seed * 7 + 1)}
        if self.method.uses_unlabeled:
            if unlabeled_idx.numel() == 0:
                raise ConfigError(f"--labeled: method {cfg.method!r} needs unlabeled images but every image is labeled")
            for k in range(1 + self.method.extra_unlabeled_batches):
                self.streams[f"unlabeled{k}"] = stream(unlabeled_idx, labeled=False,
                                                       batch_size=cfg.unlabeled_batch_size, seed=cfg.seed * 7 + 2 + k)
        # labels of some unlabeled images, held here for the diagnostics only: never in a batch
        diagnostic_images = getattr(self.data, "diagnostic_images", None)
        self._diag = (diagnostic_images(unlabeled_idx, device=self.device, limit=DIAGNOSTIC_IMAGES)
                      if diagnostic_images is not None and unlabeled_idx.numel() else None)
        self.optimizer = build_sgd(*self.method.param_groups(), lr=cfg.lr, head_lr_mult=cfg.head_lr_mult,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.finite_step = FiniteStep(self.optimizer, [b for net in self.method.students() for b in net.buffers()])
        # The data generator draws crops for the global batch, alike on every rank (see
        # data/source.py); the methods' own augmentation (strong views, CutMix boxes) must differ
        # between ranks, so under DDP it has a generator per rank.
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.aug_generator = self.generator
        losses = self.method.losses
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.aug_generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * (self.dist.rank + 1))
            # forward = the method's losses, so DDP's gradient hooks cover every student; the
            # banks and running statistics are kept identical by the methods (gathered updates),
            # so buffers are not re-broadcast every step.
            # (torch >= 2.13 names the switch forward_sync_buffers; older ones broadcast_buffers)
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})
            losses = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.method.ddp_find_unused_parameters, **no_buffer_sync)
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.type == "cuda")
        self._losses = torch.compile(losses) if use_compile else losses

        # -- bookkeeping: device-side so the step never syncs --
        self.step = 0
        self.best_miou = float("-inf")
        self.last_metrics: SegMetrics | None = None
        self._step_t = torch.zeros((), dtype=torch.long, device=self.device)
        # skipped (non-finite) steps since the last read: count, first one, longest run in a row
        self._skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self._first_skipped = torch.full((), -1, dtype=torch.long, device=self.device)
        self._in_a_row = torch.zeros((), dtype=torch.long, device=self.device)
        self._streak_start = torch.zeros((), dtype=torch.long, device=self.device)
        self._most_in_a_row = torch.zeros((), dtype=torch.long, device=self.device)
        self._stop_signal: int | None = None
        self._progress = torch.zeros((), dtype=torch.float32, device=self.device)
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_n = 0
        self._switch_steps = {k: torch.zeros((), dtype=torch.long, device=self.device) for k in self.method.SWITCHES}

        if not self.dist.is_main:  # one process writes the run directory and talks to the user
            self.echo = lambda *args, **kwargs: None
        if cfg.resume:
            self.load(self.run_dir / "latest.pt")
            self.echo(f"resumed from {self.run_dir / 'latest.pt'} at iteration {self.step}")
        self.logger = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json", cfg.to_json() + "\n")
            self.logger = ScalarLogger(self.run_dir, cfg.log_backend, after_step=self.step if cfg.resume else None)

    # -- data ---------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        x, y = self.streams["labeled"].next(self.generator)
        batch = {"x_l": x, "y_l": y}
        for k in range(1 + self.method.extra_unlabeled_batches if self.method.uses_unlabeled else 0):
            suffix = "" if k == 0 else str(k)
            batch["x_u" + suffix], batch["pad_u" + suffix] = self.streams[f"unlabeled{k}"].next(self.generator)
        return batch

    # -- one iteration ------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lr = set_lr(self.optimizer, cfg.lr, poly_factor(self.step, cfg.iters, cfg.lr_power))
        self._progress.fill_(self.step / cfg.iters)
        self.finite_step.begin()
        with nvtx_range("data"):
            batch = self.next_batch()
        # autocast covers augment too: some methods run a no-grad labelling pass there
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            self.method.begin_step(self.step)
            with nvtx_range("augment"):
                batch = self.method.augment(batch, self.aug_generator)
            out = self._losses(batch, self._progress)
        with nvtx_range("backward"):
            out["loss"].backward()
        with nvtx_range("optimizer"):
            bad = ~self.finite_step.step(out["loss"])
            self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(self.step)
        self._step_t += 1  # iterations are numbered from 1, as in the progress bar and the logs
        self.step += 1
        self._skipped += bad
        self._first_skipped = torch.where((self._first_skipped < 0) & bad, self._step_t, self._first_skipped)
        self._in_a_row = (self._in_a_row + 1) * bad
        self._streak_start = torch.where(bad & (self._in_a_row == 1), self._step_t, self._streak_start)
        self._most_in_a_row = torch.maximum(self._most_in_a_row, self._in_a_row)
        self.lr = lr
        return out

    def _check_skipped(self) -> int:
        """Read (one sync) and reset the skipped-step counters; warn, or stop after too many in a row."""
        stats = torch.stack((self._skipped, self._most_in_a_row, self._first_skipped, self._streak_start))
        skipped, in_a_row, first, streak = (int(v) for v in self.dist.all_reduce(stats, "max").tolist())
        self._skipped.zero_()
        self._first_skipped.fill_(-1)
        self._most_in_a_row.zero_()
        if in_a_row >= MAX_SKIPPED_IN_A_ROW:
            last = self.run_dir / "latest.pt"
            kept = f"; the last checkpoint, {last}, holds finite weights" if last.is_file() else ""
            raise NonFiniteLossError(
                f"the loss or the gradients were NaN/inf in {in_a_row} iterations in a row (method {self.cfg.method}, "
                f"first at iteration {streak}){kept}. Lower --lr, check the data, or resume with --resume.")
        if skipped:
            self.echo(f"warning: skipped {skipped} iteration(s) with a NaN/inf loss or gradient, the first at "
                      f"iteration {first}; the weights were left as they were")
        return skipped

    def _on_signal(self, signum, frame) -> None:
        # stop after the current iteration, when the state is whole; a second signal stops at once
        self._stop_signal = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def train(self, max_steps: int | None = None) -> SegMetrics | None:
        """Run until ``cfg.iters`` (or until ``max_steps`` total iterations, for tests and profiling)."""
        cfg = self.cfg
        stop = cfg.iters if max_steps is None else min(max_steps, cfg.iters)
        bar = _progress_bar(cfg.iters, self.step, cfg.progress and self.dist.is_main)
        images_per_step = cfg.batch_size + (cfg.unlabeled_batch_size * (1 + self.method.extra_unlabeled_batches)
                                            if self.method.uses_unlabeled else 0)
        t0, s0 = time.perf_counter(), self.step
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.step < stop:
                out = self.train_step()
                for k, v in out.items():
                    v = v.detach().float()
                    self._acc[k] = self._acc[k] + v if k in self._acc else v
                self._acc_n += 1
                for k in self._switch_steps:
                    self._switch_steps[k] += out[k].detach() > 0
                if bar is not None:
                    bar.update(1)
                last = self.step == stop
                if self.step % cfg.log_every == 0 or last or self._stop_signal is not None:
                    skipped = self._check_skipped()
                    keys = sorted(self._acc)
                    sums = self.dist.all_reduce(torch.stack([self._acc[k] for k in keys])) / self.dist.world
                    means = dict(zip(keys, (sums / self._acc_n).tolist()))
                    means["lr"] = self.lr
                    means["skipped_steps"] = skipped
                    switches = {f"switch/{k}": v / self.step for k, v in self.switch_steps().items()}
                    self._acc, self._acc_n = {}, 0
                    ips = (self.step - s0) * images_per_step * self.dist.world / max(time.perf_counter() - t0, 1e-9)
                    if self.logger is not None:
                        self.logger.log(self.step, {f"train/{k}": v for k, v in means.items()}
                                        | {"train/images_per_s": ips} | switches)
                    if bar is not None:
                        bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{means['lr']:.2e}", img_s=f"{ips:.1f}")
                do_eval = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.iters
                if do_eval:
                    self.run_eval()
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or do_eval or last:
                    self.save(self.run_dir / "latest.pt")
                if self._stop_signal is not None:
                    self.save(self.run_dir / "latest.pt")
                    self.echo(f"\n{signal.Signals(self._stop_signal).name}: stopped at iteration {self.step}; "
                              f"{self.run_dir / 'latest.pt'} saved, continue with --resume")
                    raise Interrupted(self._stop_signal)
            if self.step == cfg.iters and s0 < self.step:
                for k, steps in self.switch_steps().items():
                    if steps == 0:
                        self.echo(f"note: {cfg.method}: {self.method.SWITCHES[k]} never switched on in this run "
                                  f"({k} was 0 in all {self.step} iterations)")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            if bar is not None:
                bar.close()
        return self.last_metrics

    def switch_steps(self) -> dict[str, int]:
        """Iterations so far in which each of the method's ``SWITCHES`` was on (one sync)."""
        if not self._switch_steps:
            return {}
        counts = self.dist.all_reduce(torch.stack(list(self._switch_steps.values())), "max").tolist()
        return dict(zip(self._switch_steps, (int(c) for c in counts)))

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """``diag/*`` scalars: the method's pseudo-labels on the held unlabeled images against their labels."""
        x, y = self._diag
        known = y != self.data.ignore_index
        report = self.method.pseudo_label_report(x, torch.ones_like(known))
        objects = known & (y != 0)  # class 0 is the background in every data set here
        keep = report["keep"] & known

        def share(hit: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
            return (hit & among).sum() / among.sum().clamp(min=1)

        right = report["label"] == y
        out = {"pl_acc": share(right, known), "pl_acc_objects": share(right, objects),
               "confident_share": share(keep, known), "confident_share_objects": share(keep, objects),
               "confident_acc": share(right, keep), "confident_acc_objects": share(right, keep & objects)}
        for name, value in report.items():
            if name.startswith("pred/"):
                out[name[len("pred/"):] + "_acc"] = share(value == y, known)
                out[name[len("pred/"):] + "_acc_objects"] = share(value == y, objects)
            elif name not in ("label", "keep"):
                out[name] = value
        keys = list(out)
        values = torch.stack([out[k].float() for k in keys]).tolist()
        return {f"diag/{k}": v for k, v in zip(keys, values)}

    def run_eval(self) -> SegMetrics:
        with nvtx_range("eval"):
            mat = val_confusion(self.data, self.method.eval_model(), batch_size=self.cfg.eval_batch_size,
                                device=self.device, amp_dtype=self.amp_dtype, rank=self.dist.rank,
                                world=self.dist.world)
            metrics = SegMetrics.from_confusion(self.dist.all_reduce_sum(mat))
        self.last_metrics = metrics
        scalars = {"val/mIoU": metrics.miou, "val/pixel_acc": metrics.pixel_acc}
        scalars |= {f"val/IoU/{n}": v for n, v in zip(self.data.class_names, metrics.iou)}
        if self._diag is not None:
            scalars |= self.diagnostics()
        if self.logger is not None:
            self.logger.log(self.step, scalars)
        if metrics.miou > self.best_miou:
            self.best_miou = metrics.miou
            if self.dist.is_main:  # the evaluated weights and the config: what using the model needs
                atomic_save({"version": __version__, "step": self.step, "miou": metrics.miou, "config": self.cfg.to_dict(),
                             "model": self.method.eval_model().state_dict()}, self.run_dir / "best.pt")
        return metrics

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {
            "torch": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "python": random.getstate(),
            "numpy": _numpy_rng_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.enabled:  # every rank's tensor RNG states, row = rank (one all-gather each)
            rng["aug_generator"] = self.aug_generator.get_state()
            rng["ranks"] = {k: self.dist.gather(rng[k].to(self.device).unsqueeze(0)).cpu()
                            for k in ("torch", "cuda", "aug_generator") if k in rng}
        return {
            "version": __version__,
            "step": self.step,
            "best_miou": self.best_miou,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "streams": {k: s.state_dict() for k, s in self.streams.items()},
            "switch_steps": self.switch_steps(),
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically. Under DDP every rank must call it (the RNG states are
        gathered) and the main process writes."""
        with nvtx_range("checkpoint"):
            state = self.state_dict()
            if self.dist.is_main:
                atomic_save(state, path)
            return Path(path)

    def load(self, path: str | os.PathLike) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if not {"method", "optimizer", "streams", "rng", "step"} <= state.keys():
            raise CheckpointError(f"{path}: not a resumable checkpoint (best.pt holds weights only; resume from "
                                  "latest.pt)")
        saved = state.get("config", {})
        keys = SAME_RUN + (() if self.cfg.change_schedule else SCHEDULE)
        for key in keys:
            if saved.get(key, getattr(self.cfg, key)) != getattr(self.cfg, key):
                hint = "" if key in SAME_RUN else " (pass --change-schedule to continue with the new value)"
                raise ConfigError(f"--{key.replace('_', '-')}: checkpoint {path} was trained with {saved[key]!r}, "
                                  f"not {getattr(self.cfg, key)!r}{hint}")
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this {self.cfg.method} model ({first[:200]})") from e
        for k, s in state["streams"].items():
            self.streams[k].load_state_dict(s)
        rng = dict(state["rng"])
        if self.dist.enabled:
            ranks = rng.get("ranks", {})
            if ranks and ranks["torch"].shape[0] != self.dist.world:
                raise ConfigError(f"--resume: checkpoint {path} was written by {ranks['torch'].shape[0]} processes, "
                                  f"this run has {self.dist.world}")
            rng.update({k: v[self.dist.rank].clone() for k, v in ranks.items()})  # a row view crashes set_rng_state
            if "aug_generator" in rng:
                self.aug_generator.set_state(rng["aug_generator"].cpu())
        torch.set_rng_state(rng["torch"].cpu())
        self.generator.set_state(rng["generator"].cpu())
        random.setstate(rng["python"])
        _set_numpy_rng_state(rng["numpy"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        self.step = int(state["step"])
        self.best_miou = float(state["best_miou"])
        self._step_t.fill_(self.step)
        for k, steps in state.get("switch_steps", {}).items():
            if k in self._switch_steps:
                self._switch_steps[k].fill_(int(steps))
