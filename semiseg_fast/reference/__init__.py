"""Pure-PyTorch references of the four hot paths: the executable specification.

Readable, exact, float64-capable (every function computes in the dtype it is given), device
agnostic. They may synchronise with the host (boolean indexing, Python loops over images or
classes); the fused ops in ``semiseg_fast.ops`` are tested against them. The math of each is in
spec/methods.md section 5; module docstrings record every choice the spec leaves open.

The formulas a fused op applies around its kernel are public functions of the submodules, so
both share one home, e.g. ``from semiseg_fast.reference.spatial_kl import image_weight`` (the
package attribute ``spatial_kl`` is the loss function, not the submodule).
"""
from .contrast import (
    class_bank_contrast_hc,
    class_bank_contrast_lc,
    sampled_contrast,
    sampled_contrast_grad,
)
from .entropy_percentile import (
    class_rank,
    entropy,
    percentile,
    rank_mask,
    teacher_stats,
)
from .graph import (
    class_graph,
    class_graph_lowrank,
    graph_propagate,
    graph_propagate_grad,
    official_dense_layer,
    official_onehot,
    semantic_graph,
)
from .spatial_kl import confident_set, spatial_kl, spatial_kl_grad

__all__ = [
    "class_bank_contrast_hc",
    "class_bank_contrast_lc",
    "class_graph",
    "class_graph_lowrank",
    "class_rank",
    "confident_set",
    "entropy",
    "graph_propagate",
    "graph_propagate_grad",
    "official_dense_layer",
    "official_onehot",
    "percentile",
    "rank_mask",
    "sampled_contrast",
    "sampled_contrast_grad",
    "semantic_graph",
    "spatial_kl",
    "spatial_kl_grad",
    "teacher_stats",
]
