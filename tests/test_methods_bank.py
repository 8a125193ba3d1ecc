"""U2PL, CTT and MLLC: the official-quirk flags, the loss weighting rules, and that each method's
own terms switch on, are non-zero and send gradients to the students (a few CPU steps on the
synthetic set)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from semiseg_fast.config import TrainConfig
from semiseg_fast.engine.trainer import Trainer
from semiseg_fast.methods import METHODS, method_defaults
from semiseg_fast.methods.common import IGNORE
from semiseg_fast.methods.mllc import affinity_bce, count_confident
from semiseg_fast.methods.u2pl import drop_weighted_ce
from semiseg_fast.methods.u2pl_sampling import negative_mask, processed_rows


def tiny(tmp_path, method, **kw):
    base = dict(method=method, num_train=48, num_val=12, image_size=40, crop=32, batch_size=4, iters=40,
                eval_every=0, ckpt_every=0, log_every=5, progress=False, log_backend="csv",
                cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), labeled="1/4", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def _grad_norm(modules, loss):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def _run(trainer, steps):
    losses = []
    for _ in range(steps):
        out = trainer.train_step()
        losses.append(float(out["loss"].detach()))
    return out, losses


# -- defaults ----------------------------------------------------------------------------------

def test_method_defaults_paper_and_synthetic_preset():
    paper = method_defaults("u2pl", "voc")
    assert paper["arch"] == "deeplabv3plus_u2pl" and paper["u2pl_queue"] == 30000
    assert paper["u2pl_queue_bg"] == 50000 and paper["u2pl_contrast_weight"] == 0.1
    synth = method_defaults("u2pl", "synthetic")
    assert synth["arch"] == "deeplabv3plus" and synth["u2pl_queue"] < 30000
    assert method_defaults("ctt", "synthetic")["arch"] == "deeplabv2"
    assert method_defaults("mllc", "voc")["mllc_rounds"] == 2
    cfg = TrainConfig(method="ctt", ctt_bank=64).validate()
    assert cfg.ctt_bank == 64 and cfg.ctt_gamma == 0.75  # explicit values win, the rest resolve
    assert set(METHODS) >= {"u2pl", "ctt", "mllc"}


# -- U2PL --------------------------------------------------------------------------------------

def test_u2pl_drop_weighted_ce_is_all_over_kept_squared():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 5, 4), generator=g)
    target[0, :2] = IGNORE
    kept = target != IGNORE
    ce = F.cross_entropy(logits, target.clamp(max=2), reduction="none")
    expected = ce[kept].sum() * target.numel() / kept.sum() ** 2
    torch.testing.assert_close(drop_weighted_ce(logits, target), expected)


def test_u2pl_negative_mask_intent_and_official_q2():
    # pixels: 0 labeled GT 1, 1 unlabeled label 2, 2 unlabeled ignored; C = 4
    labels = torch.tensor([1, 2, IGNORE])
    is_labeled = torch.tensor([[True], [False], [False]])
    rank_l = torch.tensor([[True, True, True, False]] * 3)  # top-3 classes 0, 1, 2
    rank_u = torch.tensor([[False, False, True, True]] * 3)  # classes 2, 3 ranked in [3, 20)
    intent = negative_mask(labels, is_labeled, rank_l, rank_u, 4, official=False)
    assert intent.tolist() == [[True, False, True, False],   # labeled: top-3, not its own class
                               [False, False, False, True],  # unlabeled: rank in range, not label 2
                               [False, False, False, False]]  # ignored pixels never
    official = negative_mask(labels, is_labeled, rank_l, rank_u, 4, official=True)
    assert not official[0].any()  # Q2: labeled negatives are always empty
    assert official.tolist()[1] == [False, False, True, False]  # label == c and rank(c) in range


def test_u2pl_processed_rows_intent_and_official_q1():
    present = torch.tensor([False, True, False, True, True])
    neg_class, ok = processed_rows(present, official=False)
    assert neg_class.tolist() == [0, 1, 2, 3, 4] and ok.tolist() == present.tolist()
    neg_class, ok = processed_rows(present, official=True)
    # Q1: row i (i < |V| = 3) pairs class i's anchors with the queue of V[i] = (1, 3, 4)[i]
    assert neg_class[:3].tolist() == [1, 3, 4] and ok.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("flags", [{}, {"u2pl_official_q1": True, "u2pl_official_q2": True}])
def test_u2pl_terms_switch_on_and_reach_the_student(tmp_path, flags):
    trainer = Trainer(tiny(tmp_path, "u2pl", u2pl_sup_only=0.1, u2pl_queue=200, u2pl_queue_bg=300, **flags),
                      echo=lambda *a: None)
    m = trainer.method
    assert m.sup_only_steps == 4
    out, _ = _run(trainer, 4)
    assert float(out["loss_u"]) == 0 and int(m.bank.fill.sum()) == 0  # burn-in: supervised only
    out, losses = _run(trainer, 14)
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses))
    assert int(m.bank.fill.sum()) > 0
    batch = m.augment(trainer.next_batch(), trainer.generator)
    out = m.losses(batch, trainer._progress)
    assert float(out["loss_u"]) > 0
    assert _grad_norm([m.student], out["loss"] - out["loss"].detach()) > 0
    if not flags:  # with the intent, anchors and negatives exist after a few steps
        assert bool(batch["active"].any()) and float(out["loss_c"]) > 0
        # the representation head feeds only the contrastive loss
        assert _grad_norm([m.student.decoder.representation], out["loss"]) > 0
    # the teacher never gets a gradient
    assert all(p.grad is None for p in m.teacher.parameters())


# -- CTT ---------------------------------------------------------------------------------------

def test_ctt_student_learns_from_the_peer_teacher(tmp_path):
    trainer = Trainer(tiny(tmp_path, "ctt"), echo=lambda *a: None)
    m = trainer.method

    class Constant(torch.nn.Module):  # a teacher that says class 3 everywhere, fully confident
        def forward(self, x):
            logits = torch.zeros(x.shape[0], m.num_classes, x.shape[2] // 8, x.shape[3] // 8)
            logits[:, 3] = 50.0
            return {"logits": logits}

    m.emas[1] = Constant()
    batch = m.augment(trainer.next_batch(), trainer.generator)
    torch.manual_seed(5)  # the students' dropout
    out = m.losses(batch, trainer._progress)
    assert float(out["pl_weight0"]) == 1.0  # every valid pixel is confident
    torch.manual_seed(5)
    logits = m.nets[0](torch.cat((batch["x_l"], batch["x_s"])))["logits"][batch["x_l"].shape[0]:]
    logits = F.interpolate(logits, size=batch["x_s"].shape[-2:], mode="bilinear", align_corners=True)
    valid = torch.where(batch["box"], ~batch["pad_u"].roll(1, 0), ~batch["pad_u"])
    target = torch.where(valid, 3, IGNORE)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(out["loss_ct0"], expected.detach(), rtol=1e-5, atol=1e-6)


def test_ctt_contrast_switches_on_when_the_banks_fill(tmp_path):
    # gamma 1: every unlabeled pixel is an LC anchor (the young teachers are confident on background)
    trainer = Trainer(tiny(tmp_path, "ctt", ctt_bank=2, ctt_gamma=1.0), echo=lambda *a: None)
    m = trainer.method
    out, losses = _run(trainer, 8)
    assert float(out["contrast_on"]) == 0 and float(out["loss_hc0"]) == 0 and float(out["loss_lc0"]) == 0
    # the teachers admit confident, correct labeled pixels after each step (background first)
    assert all(int(b.fill.sum()) > 0 for b in m.banks), [b.fill.tolist() for b in m.banks]
    assert all(v == v for v in losses)
    # fill the rest of every queue with unit keys: the switch-on condition
    g = torch.Generator().manual_seed(0)
    for bank in m.banks:
        keys = F.normalize(torch.randn(2 * m.num_classes, 256, generator=g), dim=1)
        bank.enqueue(keys, torch.arange(m.num_classes).repeat(2))
        assert bool(bank.is_full())
    batch = m.augment(trainer.next_batch(), trainer.generator)
    out = m.losses(batch, trainer._progress)
    assert float(out["contrast_on"]) == 1 and float(out["loss_hc0"]) > 0 and float(out["loss_hc1"]) > 0
    # directional mask: each unlabeled pixel is an LC anchor of the less confident student only
    assert float(out["loss_lc0"]) + float(out["loss_lc1"]) > 0

    def grads():  # of the total loss w.r.t. both students, same dropout draws
        torch.manual_seed(7)
        loss = m.losses(dict(batch), trainer._progress)["loss"]
        params = [p for net in m.nets for p in net.parameters()]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    with_contrast = grads()
    m.cfg.ctt_hc_weight = m.cfg.ctt_lc_weight = 0.0
    without = grads()
    assert not torch.allclose(with_contrast, without)  # HC + LC send gradients to the students


# -- MLLC --------------------------------------------------------------------------------------

def test_mllc_affinity_bce_by_hand():
    f = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]], dtype=torch.float64)  # [1, 2, 1, 3]
    labels = torch.tensor([[[0, 1, IGNORE]]])
    z = F.normalize(f.flatten(2), dim=1)[0]
    sim = (z.T @ z).clamp(1e-4, 1 - 1e-4)[:2, :2]
    same = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = -(same * sim.log() + (1 - same) * (1 - sim).log()).mean()
    torch.testing.assert_close(affinity_bce(f, labels).double(), expected.float().double(), rtol=1e-6, atol=1e-6)


def test_mllc_terms_switch_on_and_reach_the_graph_layers(tmp_path):
    trainer = Trainer(tiny(tmp_path, "mllc", mllc_proto_start=0.1), echo=lambda *a: None)
    m = trainer.method
    out, losses = _run(trainer, 6)
    assert all(v == v for v in losses)
    assert bool(m.proto_seen.any())
    batch = m.augment(trainer.next_batch(), trainer.generator)
    state = copy.deepcopy(m.state_dict())  # losses() updates the prototypes and class counts
    torch.manual_seed(3)
    early = m.losses(dict(batch), torch.tensor(0.0))
    m.load_state_dict(state)
    torch.manual_seed(3)
    late = m.losses(dict(batch), torch.tensor(0.5))
    assert float(late["loss_proto"]) > 0 and float(late["loss_aff"]) > 0 and float(late["loss_u"]) >= 0
    # before proto_start the prototype term is weighted 0, after it mllc_proto_weight
    gap = float((late["loss"] - early["loss"]).detach())
    assert gap == pytest.approx(m.cfg.mllc_proto_weight * float(late["loss_proto"]), rel=1e-4)
    assert _grad_norm([m.student.layers], late["loss"]) > 0


def test_mllc_dynamic_thresholds_count_confident_predictions(tmp_path):
    net = Trainer(tiny(tmp_path, "mllc"), echo=lambda *a: None).method.student
    assert torch.equal(net.eta(), torch.zeros(8))  # no count yet: every pixel passes eta
    logits = torch.zeros(1, 8, 2, 3)
    logits[0, 2, :, :2] = 20.0  # four confident pixels of class 2
    logits[0, 5, 0, 2] = 20.0  # one of class 5
    logits[0, 5, 1, 2] = 2.0  # one unsure pixel: not counted
    count_confident(net.class_counts, logits)
    count_confident(net.class_counts, logits, valid=torch.tensor([[[True, False, True], [True, True, True]]]))
    assert net.class_counts.tolist() == [0, 0, 7, 0, 0, 2, 0, 0]
    torch.testing.assert_close(net.eta(), torch.tensor([0, 0, 0.95, 0, 0, 0.95 * 2 / 7, 0, 0]))


def test_mllc_official_mask_flag_changes_the_class_graph(tmp_path):
    a = Trainer(tiny(tmp_path, "mllc", out=str(tmp_path / "a")), echo=lambda *a: None).method
    torch.manual_seed(0)
    b = Trainer(tiny(tmp_path, "mllc", mllc_official_mask=True, out=str(tmp_path / "b")), echo=lambda *a: None).method
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        za, zb = a.student(x)["levels"][1][1], b.student(x)["levels"][1][1]
    assert not torch.allclose(za, zb)


def test_mllc_batch_graph_is_one_graph_over_the_batch():
    from semiseg_fast.errors import ConfigError
    from semiseg_fast.models.graph_head import EMBED, G2Layer
    from semiseg_fast.reference.graph import graph_propagate as ref_layer

    torch.manual_seed(3)
    c, b, h, w = 5, 3, 4, 5
    per_image = G2Layer(c, official_mask=False).double()
    batch = copy.deepcopy(per_image)
    batch.batch_graph = True
    z = torch.randn(b, c, h, w, dtype=torch.float64)
    f = torch.randn(b, EMBED, h, w, dtype=torch.float64)
    eta = torch.full((c,), 0.3, dtype=torch.float64)
    zb, fb = batch(z, f, eta)
    # the same as the reference layer on the B*h*w pixel rows of the whole batch (image-major)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    z_ref, f_ref = ref_layer(rows(z), rows(f), eta, batch.conv_z, batch.conv_f, k=21, threshold=0.95)
    torch.testing.assert_close(rows(zb), z_ref)
    torch.testing.assert_close(rows(fb), f_ref)
    # and not the per-image graphs: neighbours and classes now cross images
    zi, fi = per_image(z, f, eta)
    assert not torch.allclose(zb, zi) and not torch.allclose(fb, fi)
    with pytest.raises(ValueError, match="per image"):
        G2Layer(c, official_mask=True, batch_graph=True)
    with pytest.raises(ConfigError, match="--mllc-batch-graph"):
        TrainConfig(method="mllc", mllc_batch_graph=True, mllc_official_mask=True).validate()
