"""Training engine: trainer, EMA, memory bank, optimizer schedule, evaluation, checkpoints, logging, NVTX."""
from .bank import ClassMemoryBank
from .checkpoint import atomic_save, load_checkpoint
from .ema import EMA, ema_decay
from .evaluate import ConfusionMatrix, SegMetrics, evaluate
from .nvtx import nvtx_range
from .optim import build_sgd, poly_factor, set_lr
from .streams import IndexStream

__all__ = [
    "ClassMemoryBank", "EMA", "ConfusionMatrix", "IndexStream", "SegMetrics", "atomic_save", "build_sgd", "ema_decay",
    "evaluate", "load_checkpoint", "nvtx_range", "poly_factor", "set_lr",
]
