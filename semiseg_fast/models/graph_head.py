"""MLLC's graph rounds on top of a DeepLabV2 with the MLLC heads (spec/methods.md section 3).

``MLLCNet(base, ...)`` runs the base network, then K ``G2Layer`` rounds, each one call of
``ops.graph_propagate`` (semantic graph mixing the logits Z, class graph propagating the
embedding F). The dynamic thresholds eta_c come from ``class_counts``, a buffer the method fills
(``methods.mllc.count_confident``) so that evaluation uses them too.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops

K_NEIGHBOURS = 21
CONF = 0.95  # confident pixel for the graph mix and the class counts
EMBED = 256


class G2Layer(nn.Module):
    """One graph round on a batch: ``ops.graph_propagate`` with this layer's 1x1 convs, on one graph
    per image (the paper's) or, with ``batch_graph``, one graph over the pixels of the whole batch
    (inter-image neighbours and classes; N = B h w nodes, which the official dense layer cannot hold)."""

    def __init__(self, num_classes: int, official_mask: bool, batch_graph: bool = False):
        super().__init__()
        if batch_graph and official_mask:
            raise ValueError("mllc: the official class-graph layout is defined per image; it cannot be batch-wide")
        self.conv_z = nn.Sequential(nn.Conv2d(num_classes, num_classes, 1), nn.Conv2d(num_classes, num_classes, 1))
        self.conv_f = nn.Sequential(nn.Conv2d(EMBED, EMBED, 1), nn.ReLU(inplace=True), nn.Conv2d(EMBED, EMBED, 1))
        self.official_mask = official_mask
        self.batch_graph = batch_graph

    def forward(self, z: Tensor, f: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` float [B, C, h, w] logits, ``f`` float [B, 256, h, w] embeddings, ``eta`` float32 [C]
        thresholds -> the next round's (z, f), same shapes and dtypes."""
        b, _, h, w = z.shape
        z_nodes, f_nodes = z.flatten(2).transpose(1, 2), f.flatten(2).transpose(1, 2)  # [B, h w, channels]
        if self.batch_graph:
            z_all, f_all = ops.graph_propagate(z_nodes.reshape(b * h * w, -1), f_nodes.reshape(b * h * w, -1), eta,
                                               self.conv_z, self.conv_f, k=min(K_NEIGHBOURS, b * h * w), threshold=CONF)
            return (z_all.reshape(b, h, w, -1).permute(0, 3, 1, 2), f_all.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        # one graph per image, all images in one op call (one kernel launch per pass)
        z_all, f_all = ops.graph_propagate(z_nodes, f_nodes, eta, self.conv_z, self.conv_f, k=min(K_NEIGHBOURS, h * w),
                                           official_layout=self.official_mask, h=h, w=w, threshold=CONF)
        return z_all.transpose(1, 2).reshape(b, -1, h, w), f_all.transpose(1, 2).reshape(b, -1, h, w)


class MLLCNet(nn.Module):
    """DeepLabV2 (MLLC heads) + K graph rounds; ``forward`` returns the last round's logits as
    ``"logits"`` and every level in ``"levels"`` (a list of (Z_k, F_k))."""

    def __init__(self, base: nn.Module, num_classes: int, rounds: int, official_mask: bool, batch_graph: bool = False):
        super().__init__()
        self.base = base
        self.layers = nn.ModuleList(G2Layer(num_classes, official_mask, batch_graph) for _ in range(rounds))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.float64))

    def eta(self) -> Tensor:
        """float32 [C]: 0.95 w_c / max w of the confident-prediction counts."""
        w = self.class_counts
        return (CONF * w / (w.max() + 1e-10)).float()

    def forward(self, x: Tensor, need_fp: bool = False) -> dict:
        """``x`` float [B, 3, H, W] in [0, 1] -> ``logits`` float [B, C, H/8, W/8] of the last round and
        ``levels``, every round's (Z_k float [B, C, H/8, W/8], F_k float [B, 256, H/8, W/8])."""
        out = self.base(x)
        z, f = out["logits"], out["rep"]
        levels = [(z, f)]
        eta = self.eta()
        for layer in self.layers:
            z, f = layer(z, f, eta)
            levels.append((z, f))
        return {"logits": z, "levels": levels}

    def backbone_parameters(self):
        return self.base.backbone_parameters()

    def head_parameters(self):
        return self.base.head_parameters() + list(self.layers.parameters())
