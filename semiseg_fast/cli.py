"""Command-line entry point behind ``train.py`` and the ``semiseg-train`` script."""
from __future__ import annotations

import os
import sys
import time

from .config import parse_config
from .errors import ConfigError, DataError, NonFiniteLossError


def main(argv: list[str] | None = None) -> int:
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
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError) as e:
        if os.environ.get("SEMISEG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
