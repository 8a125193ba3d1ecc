"""Training engine, the layer above the methods: trainer, evaluation, checkpoints, distributed
set-up, optimizer schedule, logging."""
from .checkpoint import atomic_save, load_checkpoint
from .evaluate import ConfusionMatrix, SegMetrics, evaluate
from .optim import build_sgd, poly_factor, set_lr

__all__ = ["ConfusionMatrix", "SegMetrics", "atomic_save", "build_sgd", "evaluate", "load_checkpoint", "poly_factor",
           "set_lr"]
