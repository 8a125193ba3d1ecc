"""Whole training steps: each method's step with the fused ops against the same step on the references.

    python -m profiling.bench_steps                          # every method, GPU-sized steps, CSV rows
    python -m profiling.bench_steps --method u2pl --method mllc --crop 513 --batch-size 4
    python -m profiling.bench_steps --smoke                  # tiny steps, any device (CPU: interpreter)

One Trainer per (method, provider) on the synthetic scenes, built and stepped inside
``ops.use_impl``: ``fused`` is "auto" on CUDA (every op whose kernel takes the inputs runs it) and
"triton" elsewhere (the interpreter, so that the CPU smoke exercises the kernels), ``reference``
runs every op's pure-PyTorch reference. The rest of the step (networks, optimizer, EMA) is the
same code, so the difference is what the fused ops buy. Per row:

* ms per step (median, p20, p80 over the timed steps; CUDA events around each step on CUDA, the
  wall clock elsewhere) and images per second (labeled + unlabeled images per step);
* peak memory above what the trainer held before the timed steps (CUDA only);
* host synchronisations counted over the timed steps with ``torch.cuda.set_sync_debug_mode``
  (every synchronising call warns once it is on; CUDA only, blank elsewhere);
* graph breaks: ``torch._dynamo.explain`` of the method's ``losses`` on one prepared batch (the part
  ``--compile`` compiles; dynamo's breaks do not depend on the backend, so nothing is code-generated).

The contrastive terms switch on late in a real run (U2PL after its burn-in, CTT once every bank
queue is full, MLLC's prototypes after a fraction of the run). A step benchmark must time the
steady state, so the U2PL burn-in and the MLLC prototype delay are set to 0 and every memory bank
is filled with random unit keys before the first step (the paper's queue sizes, not the CPU
presets of the synthetic set). Rows go to ``profiling/results/<device>.csv`` (bench_ops' columns,
mode "step").
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from semiseg_fast import ops
from semiseg_fast.config import TrainConfig
from semiseg_fast.engine.trainer import Trainer
from semiseg_fast.methods import METHODS
from semiseg_fast.methods.bank import ClassMemoryBank

from .harness import (
    append_rows,
    counting_host_syncs,
    peak_memory,
    quantiles,
    results_path,
    stamp,
    time_calls,
)

PROVIDERS = ("fused", "reference")

# Steady-state settings and the paper's bank sizes (the synthetic set's CPU presets shrink them).
STEADY = {"u2pl_sup_only": 0.0, "u2pl_queue": 30000, "u2pl_queue_bg": 50000, "mllc_proto_start": 0.0}


@dataclasses.dataclass
class StepSize:
    crop: int
    batch_size: int
    backbone: str
    num_train: int

    @property
    def case(self) -> str:
        return f"{self.crop}px b{self.batch_size} {self.backbone}"


GPU_SIZE = StepSize(crop=321, batch_size=4, backbone="resnet101", num_train=64)
SMOKE_SIZE = StepSize(crop=32, batch_size=2, backbone="resnet18", num_train=16)


def provider_mode(provider: str, device: torch.device) -> str:
    if provider == "reference":
        return "reference"
    return "auto" if device.type == "cuda" else "triton"


def step_config(method: str, size: StepSize, device: torch.device, out: str, compile_mode: str,
                smoke: bool) -> TrainConfig:
    cfg = TrainConfig(method=method, data="synthetic", device=device.type, out=out, backbone=size.backbone,
                      crop=size.crop, image_size=size.crop, batch_size=size.batch_size, num_train=size.num_train,
                      num_val=4, labeled=max(2 * size.batch_size, size.num_train // 8), iters=1000, eval_every=0,
                      ckpt_every=0, progress=False, compile=compile_mode, log_backend="csv")
    for name, value in STEADY.items():
        if not (smoke and name.endswith(("queue", "queue_bg"))):  # smoke: the CPU preset queues
            setattr(cfg, name, value)
    return cfg.validate()


@torch.no_grad()
def fill_banks(module: torch.nn.Module, generator: torch.Generator) -> int:
    """Fill every class memory bank of ``module`` with random unit keys; returns the banks filled."""
    n = 0
    for bank in module.modules():
        if isinstance(bank, ClassMemoryBank):
            dev = bank.keys().device
            labels = torch.cat([torch.full((cap,), c, device=dev) for c, cap in enumerate(bank.capacities)])
            keys = torch.randn((labels.numel(), bank.dim), generator=generator, device=dev)
            bank.enqueue(torch.nn.functional.normalize(keys, dim=1), labels)
            n += 1
    return n


def images_per_step(trainer: Trainer) -> int:
    cfg, method = trainer.cfg, trainer.method
    unlabeled = (1 + method.extra_unlabeled_batches) * cfg.unlabeled_batch_size if method.uses_unlabeled else 0
    return cfg.batch_size + unlabeled


def time_steps(trainer: Trainer, steps: int) -> tuple[list[float], int | None]:
    """Per-step milliseconds (CUDA events, the steps queued back to back as in training), and the
    host synchronisations of one more step (None off CUDA), counted apart from the timed ones:
    every counted sync raises a recorded Python warning, host time that would slow the sync-heavy
    reference steps most."""
    times = time_calls(trainer.train_step, steps, trainer.device)
    with counting_host_syncs(trainer.device) as syncs:
        trainer.train_step()
    return times, syncs.value


def graph_breaks(trainer: Trainer) -> int:
    """Dynamo graph breaks in the method's ``losses`` on one freshly prepared batch."""
    import torch._dynamo

    torch._dynamo.reset()
    batch = trainer.next_batch()
    amp = trainer.amp_dtype
    with torch.autocast(trainer.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        trainer.method.begin_step(trainer.step)
        batch = trainer.method.augment(batch, trainer.aug_generator)
        explained = torch._dynamo.explain(trainer.method.losses)(batch, trainer._progress)
    torch._dynamo.reset()
    return explained.graph_break_count


def bench_method(method: str, provider: str, size: StepSize, device: torch.device, steps: int, warmup: int,
                 compile_mode: str, smoke: bool, count_breaks: bool) -> dict:
    with tempfile.TemporaryDirectory() as out, ops.use_impl(provider_mode(provider, device)):
        cfg = step_config(method, size, device, out, compile_mode, smoke)
        trainer = Trainer(cfg, echo=lambda *a, **k: None)
        fill_banks(trainer.method, torch.Generator(device=trainer.device).manual_seed(0))
        for _ in range(warmup):
            trainer.train_step()
        with peak_memory(device) as measured:
            ms, syncs = time_steps(trainer, steps)
        peak = measured.mb
        breaks = graph_breaks(trainer) if count_breaks else None
        med, p20, p80 = quantiles(ms)
        images = images_per_step(trainer)
        compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return {"op": method, "case": size.case, "dtype": "bf16-amp" if trainer.amp_dtype is not None else "fp32",
            "provider": provider, "mode": "step", "ms_median": f"{med:.4f}", "ms_p20": f"{p20:.4f}",
            "ms_p80": f"{p80:.4f}", "peak_mb": "" if peak is None else f"{peak:.1f}",
            "images_s": f"{images / (med * 1e-3):.4g}", "host_syncs": "" if syncs is None else str(syncs),
            "graph_breaks": "" if breaks is None else str(breaks),
            "note": f"{steps} steps after {warmup}, {'compiled' if compiled else 'eager'}, {images} images/step"}


def run(methods, size: StepSize, device: torch.device, out: Path | None, *, steps: int = 10, warmup: int = 3,
        compile_mode: str = "auto", smoke: bool = False, count_breaks: bool = True, echo=print) -> list[dict]:
    env = stamp(device)
    rows = []
    for method in methods:
        for provider in PROVIDERS:
            # graph breaks are a property of the method's code (the ops are opaque either way): count once
            row = env | bench_method(method, provider, size, device, steps, warmup, compile_mode, smoke,
                                     count_breaks and provider == "fused")
            rows.append(row)
            echo(f"{method:<10} {provider:<9} {float(row['ms_median']):9.2f} ms/step [{float(row['ms_p20']):.2f}, "
                 f"{float(row['ms_p80']):.2f}]  {row['images_s']:>8} img/s  peak {row['peak_mb'] or 'n/a'} MB  "
                 f"syncs {row['host_syncs'] or 'n/a'}  breaks {row['graph_breaks'] or '-'}")
        fused, reference = rows[-2], rows[-1]
        echo(f"{method:<10} fused / reference: {float(reference['ms_median']) / float(fused['ms_median']):.2f}x faster"
             + (f", {float(fused['peak_mb']) / max(float(reference['peak_mb']), 1e-9):.2f}x the peak memory"
                if fused["peak_mb"] else ""))
    if out is not None and rows:
        append_rows(out, rows)
        echo(f"appended {len(rows)} rows to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.bench_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--method", action="append", choices=sorted(METHODS), help="repeatable; default all")
    parser.add_argument("--smoke", action="store_true", help="tiny steps (CPU: the Triton interpreter)")
    parser.add_argument("--crop", type=int, help=f"crop side (default {GPU_SIZE.crop}; smoke {SMOKE_SIZE.crop})")
    parser.add_argument("--batch-size", type=int, help="labeled (= unlabeled) images per step")
    parser.add_argument("--backbone", choices=("resnet18", "resnet50", "resnet101"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="as train.py")
    parser.add_argument("--no-graph-breaks", action="store_true", help="skip the dynamo explain pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    base = SMOKE_SIZE if args.smoke else GPU_SIZE
    size = dataclasses.replace(base, crop=args.crop or base.crop, batch_size=args.batch_size or base.batch_size,
                               backbone=args.backbone or base.backbone)
    for name in ("steps", "warmup", "crop", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    out = None if args.no_csv or args.smoke else results_path(device)
    run(args.method or list(METHODS), size, device, out, steps=args.steps, warmup=args.warmup,
        compile_mode=args.compile, smoke=args.smoke, count_breaks=not args.no_graph_breaks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
