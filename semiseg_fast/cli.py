"""Command-line entry point behind ``train.py`` and the ``semiseg-train`` script.

Every expected failure ends in one line on stderr that names the cause and the argument or file,
and an exit status: 2 for a bad command line or configuration (``ConfigError``), 1 for a failure
while running (bad or missing data, a corrupt checkpoint, a full disk, a permission, a NaN run),
128 + the signal for SIGINT (130) or SIGTERM (143), after ``latest.pt`` was written. ``--debug`` (or ``SEMISEG_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import os
import sys
import time

from .config import parse_config
from .errors import CheckpointError, ConfigError, DataError, NonFiniteLossError

USAGE_ERROR, RUN_ERROR = 2, 1
RUN_ERRORS = (DataError, NonFiniteLossError, CheckpointError, OSError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SEMISEG_DEBUG"))
    try:
        cfg = parse_config(argv)
        from .engine.trainer import Trainer

        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        say = trainer.echo  # silent on every process but the first under torchrun
        where = f"{trainer.dist.world} processes ({trainer.device.type})" if trainer.dist.enabled else str(trainer.device)
        say(f"{cfg.method} on {cfg.data}: {trainer.num_labeled} labeled of {trainer.data.num_train} "
            f"training images, {cfg.iters} iterations on {where}; run directory {trainer.run_dir}", flush=True)
        metrics = trainer.train()
        if metrics is None:  # resumed a finished run
            metrics = trainer.run_eval()
        say(f"\nvalidation ({trainer.data.num_val} images) of the {cfg.method} model "
            f"after {trainer.step} iterations, {time.perf_counter() - t0:.0f} s:")
        say(metrics.table(trainer.data.class_names))
        return 0
    except (ConfigError, *RUN_ERRORS) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR if isinstance(e, ConfigError) else RUN_ERROR
    except KeyboardInterrupt as e:  # the trainer saved latest.pt first (Interrupted carries the signal)
        return 128 + getattr(e, "signum", 2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
