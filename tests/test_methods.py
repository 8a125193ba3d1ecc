"""Method semantics that the end-to-end runs cannot see: UniMatch's cut-mixed targets and
IPixMatch's extra term and ramp."""
import math

import torch

from semiseg_fast.config import TrainConfig
from semiseg_fast.methods import build_method
from semiseg_fast.methods.ipixmatch import gaussian_rampup

C, H, W = 4, 16, 16


def _cfg(method, **kw):
    return TrainConfig(method=method, conf_thresh=0.5, **kw)


def _batch(generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    pad = torch.zeros(2, H, W, dtype=torch.bool)
    pad[:, :, -3:] = True  # padded columns of the weak views
    return {
        "x_l": torch.rand(2, 3, H, W, generator=g), "y_l": torch.randint(0, C, (2, H, W), generator=g),
        "x_u": torch.rand(2, 3, H, W, generator=g), "pad_u": pad,
        "x_u1": torch.rand(2, 3, H, W, generator=g), "pad_u1": torch.zeros(2, H, W, dtype=torch.bool),
    }


def test_unimatch_strong_view_targets_come_from_the_mix_batch_inside_the_box():
    method = build_method("unimatch", _cfg("unimatch", backbone="resnet18"), C)
    batch = method.augment(_batch(), torch.Generator().manual_seed(1))
    batch["box1"] = torch.zeros(2, H, W, dtype=torch.bool)
    batch["box1"][:, 2:9, 4:12] = True
    batch["logits_m"] = torch.zeros(2, C, H, W)
    batch["logits_m"][:, 3] = 5.0  # mix batch says class 3
    logits_w = torch.zeros(2, C, H, W)
    logits_w[:, 1] = 5.0  # weak view says class 1
    t = method.weak_targets(batch, logits_w)
    pl, conf, valid = t["s1"]
    box = batch["box1"]
    assert torch.equal(pl[box], torch.full_like(pl[box], 3)) and torch.equal(pl[~box], torch.full_like(pl[~box], 1))
    # padding travels with the pixels: inside the box the mix batch (unpadded) decides
    assert valid[box].all() and torch.equal(valid[~box], ~batch["pad_u"][~box])
    assert torch.allclose(conf, torch.full_like(conf, conf[0, 0, 0].item()))
    pl_w, _, valid_w = t["w"]
    assert (pl_w == 1).all() and torch.equal(valid_w, ~batch["pad_u"])


def test_ipixmatch_is_unimatch_plus_the_weighted_spatial_kl():
    torch.manual_seed(0)
    uni = build_method("unimatch", _cfg("unimatch"), C)
    ipix = build_method("ipixmatch", _cfg("ipixmatch", ipix_tau=0.0, ipix_warmup=0.5), C)
    ipix.load_state_dict(uni.state_dict())
    batch = uni.augment(_batch(), torch.Generator().manual_seed(1))
    progress = torch.tensor(0.25)  # half-way through the ramp: alpha = exp(-5/4)
    torch.manual_seed(3)  # the feature-perturbation dropout draws from the global generator
    out_u = uni.losses(dict(batch), progress)
    torch.manual_seed(3)
    out_i = ipix.losses(dict(batch), progress)
    assert math.isclose(float(out_i["ipix_alpha"]), math.exp(-1.25), rel_tol=1e-6)
    assert float(out_i["loss_ipix"]) > 0
    expected = out_u["loss"] + out_i["ipix_alpha"] * out_i["loss_ipix"]
    torch.testing.assert_close(out_i["loss"], expected, rtol=1e-5, atol=1e-6)


def test_gaussian_rampup():
    p = torch.tensor([0.0, 0.05, 0.1, 0.5])
    torch.testing.assert_close(gaussian_rampup(p, 0.1), torch.tensor([math.exp(-5), math.exp(-1.25), 1.0, 1.0]))
    assert torch.equal(gaussian_rampup(p, 0.0), torch.ones(4))
