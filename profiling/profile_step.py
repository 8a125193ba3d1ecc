"""Profile a few training steps: Chrome trace, top operators and the time of each step phase.

    python -m profiling.profile_step --method fixmatch --steps 5          # any train.py option works
    python -m profiling.profile_step --out-dir profiling/traces/fixmatch

Writes ``trace.json`` (open in chrome://tracing or https://ui.perfetto.dev), ``top_ops.txt`` and
``phases.txt`` into ``--out-dir``. The phases are the NVTX ranges of the step (data, augment,
teacher, student, loss, backward, optimizer, ema, ...); under nsys the same ranges appear as NVTX.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from semiseg_fast import nvtx
from semiseg_fast.config import TrainConfig, build_parser
from semiseg_fast.engine.trainer import Trainer


def phase_table(prof) -> str:
    """Per-phase time of the step; percentages are of the whole step (phases may nest)."""
    rows = {e.key[len("phase/"):]: e for e in prof.key_averages() if e.key.startswith("phase/")}
    use_cuda = any(getattr(e, "device_time_total", 0) for e in rows.values())
    step = rows.pop("step")
    header = f"{'phase':<16} {'calls':>6} {'CPU ms/step':>12} {'% of step':>10}"
    lines = [header + (f" {'GPU ms/step':>12}" if use_cuda else "")]
    for name, e in [("step", step)] + sorted(rows.items(), key=lambda kv: -kv[1].cpu_time_total):
        line = (f"{name:<16} {e.count:>6} {e.cpu_time_total / step.count / 1e3:>12.2f} "
                f"{100 * e.cpu_time_total / step.cpu_time_total:>9.1f}%")
        if use_cuda:
            line += f" {e.device_time_total / step.count / 1e3:>12.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m profiling.profile_step"
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before profiling (compilation, caches)")
    parser.add_argument("--out-dir", default="profiling/traces", help="where the trace and tables go")
    parser.add_argument("--row-limit", type=int, default=25, help="rows of the operator table")
    args = vars(parser.parse_args(argv))
    extra = {k: args.pop(k) for k in ("steps", "warmup", "out_dir", "row_limit")}
    args.pop("debug")  # train.py's error display (cli.py), not a config field
    cfg = TrainConfig(**args)
    cfg.iters = max(cfg.iters, extra["warmup"] + extra["steps"])
    cfg.eval_every = cfg.ckpt_every = 0
    cfg.progress = False
    out_dir = Path(extra["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.out = run_dir
        trainer = Trainer(cfg.validate(), echo=lambda *a: None)
        for _ in range(extra["warmup"]):
            trainer.train_step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        nvtx.record_functions(True)
        try:
            with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
                for _ in range(extra["steps"]):
                    with torch.profiler.record_function("phase/step"):
                        trainer.train_step()
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
        finally:
            nvtx.record_functions(False)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    sort_key = "cuda_time_total" if trainer.device.type == "cuda" else "cpu_time_total"
    ops = prof.key_averages().table(sort_by=sort_key, row_limit=extra["row_limit"])
    phases = phase_table(prof)
    (out_dir / "top_ops.txt").write_text(ops + "\n")
    (out_dir / "phases.txt").write_text(phases + "\n")
    print(f"{cfg.method} on {trainer.device}, {extra['steps']} profiled steps (NVTX backend: {nvtx.backend()})")
    print(phases)
    print(f"\ntrace: {out_dir / 'trace.json'}; operator table: {out_dir / 'top_ops.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
