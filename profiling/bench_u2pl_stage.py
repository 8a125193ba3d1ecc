"""U2PL's whole contrastive stage, engine against an official-style implementation (spec 5a).

    python -m profiling.bench_u2pl_stage            # U2PL VOC sizes, appends CSV rows
    python -m profiling.bench_u2pl_stage --smoke    # tiny sizes, any device, seconds on a CPU

One step of the stage, from the teacher/student outputs of a step to the anchor gradient: enqueue
this step's hard negatives into the per-class queues, the class prototypes, anchor and negative
sampling, the loss and its backward. Two providers on the same inputs and the same queue state:

* ``fused`` (the engine): the functions ``U2PL.augment`` calls for its "bank" and "sampling"
  blocks (``contrast_targets``, ``enqueue_negatives``, ``draw_uniforms``, ``sample_contrast`` of
  ``semiseg_fast/methods/u2pl_sampling.py``, on the GPU ring-buffer bank) and the loss of
  ``U2PL.losses`` (``ops.sampled_contrast``) with its backward, imported and called, so the
  benchmark times what the method runs; the rank masks come from ``ops.rank_mask`` on the teacher
  probabilities.
* ``official``: ``official_stage``, written from spec 5a with the official code's cost structure:
  per-class CPU queues as Python lists of tensors (cat, then keep the last ``cap`` rows), a
  Python loop over classes with boolean gathers, ``.item()`` per class, ``torch.randint`` on the
  CPU default generator, every sampled queue cloned to the device, ``torch.cat`` of prototype
  and negatives, ``cosine_similarity`` + ``cross_entropy`` and autograd. The single-process step
  has no ``all_gather_object``/barrier (the official pays one per class on several GPUs). Its
  semantics are the engine's default (the paper's intent: negatives of class c are pixels not
  labeled c, class c draws from queue c; quirks Q1/Q2 fixed), so the two compute the same loss.

Before timing, both run one step from the same state, the engine on uniforms that reproduce the
official path's CPU draws (``uniforms_for``), and must agree on the loss and the anchor gradient.
Per provider: ms per step (median, p20, p80 over the timed steps; wall clock around a synchronised
step, since the official path's host work is the point), peak device memory above the inputs, and
host synchronisations per step (``torch.cuda.set_sync_debug_mode("warn")``; CUDA only, blank on
CPU). Rows go to ``profiling/results/<device>.csv`` with bench_ops' columns (op
``u2pl_contrast_stage``, mode ``stage``).

Synthetic inputs: labels uniform over C (5 % ignored), the teacher's probabilities a softmax of
scaled Gaussian logits with the label's logit raised (so ranks are data-dependent), the low/high
entropy masks as U2PL builds them at alpha = 20 (labeled: every valid pixel; unlabeled: 20 % each),
full queues of random unit keys (the steady state: the official path clones 650k rows per step).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from semiseg_fast import ops
from semiseg_fast.methods.bank import ClassMemoryBank
from semiseg_fast.methods.common import IGNORE, to_rows
from semiseg_fast.methods.u2pl import HIGH_RANK, LOW_RANK, TEMPERATURE
from semiseg_fast.methods.u2pl_sampling import (
    DELTA_P,
    NEG_PROB,
    contrast_targets,
    draw_uniforms,
    enqueue_negatives,
    sample_contrast,
)

from .harness import (
    append_rows,
    counting_host_syncs,
    peak_memory,
    quantiles,
    results_path,
    stamp,
    time_calls,
)


@dataclasses.dataclass(frozen=True)
class StageSize:
    labeled: int  # images of the labeled half; as many unlabeled ones
    side: int  # rep grid side (1/4 of the crop)
    dim: int
    classes: int
    caps: tuple[int, ...]
    anchors: int = 256
    negatives: int = 50


SIZES = {
    # U2PL VOC: 4 + 4 images of 513^2 -> 129^2 rep pixels, D = 256, C = 21, queues 50000 + 20 x 30000
    "voc": StageSize(4, 129, 256, 21, (50000,) + (30000,) * 20),
    "smoke": StageSize(1, 9, 16, 5, (40,) + (30,) * 4, anchors=16, negatives=5),
}


def make_inputs(size: StageSize, device: torch.device, seed: int = 0) -> dict:
    """One step's stage inputs, NCHW as the networks give them (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    b, s, c = 2 * size.labeled, size.side, size.classes
    labels = torch.randint(0, c, (b, s, s), generator=g)
    labels[torch.rand(b, s, s, generator=g) < 0.05] = IGNORE
    logits = 2 * torch.randn(b, c, s, s, generator=g)
    logits += 3 * F.one_hot(labels.clamp_max(c - 1), c).permute(0, 3, 1, 2)
    valid = labels != IGNORE
    unlabeled = torch.arange(b).view(b, 1, 1) >= size.labeled
    low = valid & (~unlabeled | (torch.rand(b, s, s, generator=g) < 0.2))
    high = valid & (~unlabeled | (torch.rand(b, s, s, generator=g) < 0.2))
    rep_s = torch.randn(b, size.dim, s, s, generator=g)
    rep_t = rep_s + 0.1 * torch.randn(b, size.dim, s, s, generator=g)
    out = {"labels": labels, "prob": logits.softmax(1), "low": low, "high": high, "rep_s": rep_s,
           "rep_t": rep_t}
    return {k: v.to(device) for k, v in out.items()} | {"labeled": size.labeled}


def initial_queues(size: StageSize, fill: list[int] | None = None, seed: int = 1) -> list[torch.Tensor]:
    """Random unit keys per class, oldest first (default: full queues)."""
    g = torch.Generator().manual_seed(seed)
    fill = list(size.caps) if fill is None else fill
    return [F.normalize(torch.randn(n, size.dim, generator=g), dim=1) for n in fill]


def engine_bank(size: StageSize, queues: list[torch.Tensor], device: torch.device) -> ClassMemoryBank:
    """A ``ClassMemoryBank`` holding ``queues`` (oldest entry at slot 0, the ring not wrapped)."""
    bank = ClassMemoryBank(size.classes, size.dim, list(size.caps), device=device)
    for c, q in enumerate(queues):
        bank.bank[c, : q.shape[0]] = q.to(device)
    n = torch.tensor([q.shape[0] for q in queues], device=device)
    bank.fill.copy_(n)
    bank.ptr.copy_(torch.remainder(n, bank.capacity))
    return bank


# -- engine ---------------------------------------------------------------------------------------

def engine_stage(inp: dict, bank: ClassMemoryBank, size: StageSize, u_anchor: torch.Tensor | None = None,
                 u_neg: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """One stage step with the functions ``U2PL.augment`` ("bank", "sampling") and ``U2PL.losses``
    call; returns (loss, anchor gradient rows [N, D]). Uniforms default to fresh device draws."""
    dev = inp["labels"].device
    labels = inp["labels"].reshape(-1)
    rep_t = to_rows(inp["rep_t"])
    rank_u, rank_l = (to_rows(r) for r in ops.rank_mask(inp["prob"], LOW_RANK, HIGH_RANK))
    side2 = inp["labels"].shape[1] * inp["labels"].shape[2]
    candidates, proto, present, negative = contrast_targets(
        rep_t, labels, inp["low"].reshape(-1), inp["high"].reshape(-1), to_rows(inp["prob"]), rank_u, rank_l,
        inp["labeled"] * side2, official_q2=False)
    enqueue_negatives(bank, rep_t, negative)
    if u_anchor is None:
        u_anchor, u_neg = draw_uniforms(generator, size.classes, dev, size.anchors, size.negatives)
    sampled = sample_contrast(bank, candidates, present, u_anchor, u_neg, official_q1=False)

    rep = to_rows(inp["rep_s"]).detach().requires_grad_(True)
    loss = ops.sampled_contrast(rep, proto, bank.keys().view(-1, bank.dim), sampled["anchor_idx"],
                                sampled["neg_idx"], TEMPERATURE, num_valid=sampled["num_valid"],
                                active=sampled["active"])
    loss.backward()
    return loss.detach(), rep.grad


# -- official style -------------------------------------------------------------------------------

def official_stage(inp: dict, queues: list[torch.Tensor], size: StageSize, record: dict | None = None):
    """One stage step with the official code's structure (module docstring); ``queues`` (CPU,
    oldest first) is updated in place. ``record`` receives the CPU draws per processed class."""
    c, device = size.classes, inp["labels"].device
    labels, prob = inp["labels"], inp["prob"]
    n_l = inp["labeled"]
    label_1h = F.one_hot(torch.where(labels == IGNORE, c, labels), c + 1)[..., :c].permute(0, 3, 1, 2)
    low_valid_pixel = label_1h * inp["low"].unsqueeze(1)
    high_mask = inp["high"].unsqueeze(1)
    rep = inp["rep_s"].detach().requires_grad_(True)
    rep_nhwc = rep.permute(0, 2, 3, 1)
    rep_teacher = inp["rep_t"].permute(0, 2, 3, 1)
    _, prob_indices = torch.sort(prob, 1, True)
    prob_indices = prob_indices.permute(0, 2, 3, 1)
    valid_label = labels != IGNORE

    seg_feat_low_entropy, seg_proto, valid_classes = [], [], []
    for i in range(c):
        low_valid_seg = low_valid_pixel[:, i].bool()
        prob_seg = prob[:, i]
        rep_mask_low_entropy = (prob_seg > DELTA_P) & low_valid_seg
        seg_feat_low_entropy.append(rep_nhwc[rep_mask_low_entropy])
        seg_proto.append(torch.mean(rep_teacher[low_valid_seg].detach(), dim=0, keepdim=True))
        # negatives (paper intent): label != i, and i among the top r_l (labeled) or at rank
        # [r_l, r_h) (unlabeled) of the teacher's classes, high entropy, prob below the threshold
        class_mask_u = prob_indices[:, :, :, LOW_RANK:HIGH_RANK].eq(i).sum(dim=3).bool()
        class_mask_l = prob_indices[:, :, :, :LOW_RANK].eq(i).sum(dim=3).bool()
        class_mask = torch.cat((class_mask_l[:n_l], class_mask_u[n_l:]))
        negative = class_mask & high_mask[:, 0] & valid_label & (labels != i) & (prob_seg < NEG_PROB)
        keys = rep_teacher[negative].detach().clone().cpu()
        queues[i] = torch.cat((queues[i], keys), dim=0)[-size.caps[i]:]
        if low_valid_seg.sum().item() > 0:
            valid_classes.append(i)

    if len(valid_classes) <= 1:
        loss = 0 * rep.sum()
    else:
        loss = torch.tensor(0.0, device=device)
        for i in valid_classes:
            if len(seg_feat_low_entropy[i]) > 0 and queues[i].shape[0] > 0:
                idx = torch.randint(len(seg_feat_low_entropy[i]), size=(size.anchors,))
                anchor_feat = seg_feat_low_entropy[i][idx.to(device)]
            else:  # no candidate anchor or an empty queue: the class adds 0
                loss = loss + 0 * rep.sum()
                continue
            with torch.no_grad():
                negative_feat = queues[i].clone().to(device)
                neg = torch.randint(len(negative_feat), size=(size.anchors * size.negatives,))
                negative_feat = negative_feat[neg.to(device)].reshape(size.anchors, size.negatives, -1)
                positive_feat = seg_proto[i].unsqueeze(0).repeat(size.anchors, 1, 1)
                all_feat = torch.cat((positive_feat, negative_feat), dim=1)
            if record is not None:
                record[i] = (idx, neg.view(size.anchors, size.negatives))
            seg_logits = torch.cosine_similarity(anchor_feat.unsqueeze(1), all_feat, dim=2)
            target = torch.zeros(size.anchors, dtype=torch.long, device=device)
            loss = loss + F.cross_entropy(seg_logits / TEMPERATURE, target)
        loss = loss / len(valid_classes)
    loss.backward()
    return loss.detach(), to_rows(rep.grad)


def uniforms_for(record: dict, inp: dict, bank: ClassMemoryBank, size: StageSize):
    """Engine uniforms that select exactly the official draws: floor(u n) = r for u = (r + 1/2) / n.
    Anchors: the r-th candidate in raster order in both paths. Negatives: official index j is the
    j-th oldest entry of the queue, which ``bank`` (after this step's enqueue) holds at slot
    (ptr + j) mod cap once full and at slot j before."""
    c, device = size.classes, bank.bank.device
    labels = inp["labels"].reshape(-1)
    onehot = labels.unsqueeze(1) == torch.arange(c, device=labels.device)
    n_candidates = (onehot & inp["low"].reshape(-1, 1) & (to_rows(inp["prob"]) > DELTA_P)).sum(0).cpu()
    u_anchor = torch.full((c, size.anchors), 0.5, dtype=torch.float64)
    u_neg = torch.full((c, size.anchors, size.negatives), 0.5, dtype=torch.float64)
    fill, ptr, cap = bank.fill.cpu(), bank.ptr.cpu(), bank.capacity.cpu()
    for i, (idx, neg) in record.items():
        u_anchor[i] = (idx.double() + 0.5) / float(n_candidates[i])
        slot = torch.where(fill[i] >= cap[i], torch.remainder(ptr[i] + neg, cap[i]), neg)
        u_neg[i] = (slot.double() + 0.5) / float(fill[i])
    return u_anchor.to(device), u_neg.to(device)


def compare(inp: dict, size: StageSize, queues: list[torch.Tensor]) -> tuple[float, float, float]:
    """One step of each provider from the same state on the same draws: (official loss, engine
    loss, max |gradient difference| / max |gradient|). Leaves ``queues`` untouched."""
    device = inp["labels"].device
    record: dict = {}
    loss_o, grad_o = official_stage(inp, [q.clone() for q in queues], size, record)
    # the draws map to ring slots of the bank after this step's enqueue: a probe step gives it
    probe = engine_bank(size, queues, device)
    engine_stage(inp, probe, size)
    u_anchor, u_neg = uniforms_for(record, inp, probe, size)
    loss_e, grad_e = engine_stage(inp, engine_bank(size, queues, device), size, u_anchor, u_neg)
    scale = grad_o.abs().max().item() or 1.0
    return loss_o.item(), loss_e.item(), (grad_e - grad_o).abs().max().item() / scale


# -- timing ---------------------------------------------------------------------------------------

def time_provider(step, steps: int, device: torch.device) -> tuple[list[float], int | None, float | None]:
    """Wall-clock ms per synchronised step, host syncs per step and peak MB above the start (the
    last two None off CUDA)."""
    step()  # warm-up (compilation, allocator)
    # one step counted on its own: the timed steps below synchronise, which must not be counted
    with counting_host_syncs(device) as syncs:
        step()
    with peak_memory(device) as peak:
        times = time_calls(step, steps, device, synchronise=True)
    return times, syncs.value, peak.mb


def run(case: str, device: torch.device, steps: int, out=None, echo=print) -> list[dict]:
    size = SIZES[case]
    inp = make_inputs(size, device)
    queues = initial_queues(size)
    loss_o, loss_e, grad_rel = compare(inp, size, queues)
    # both fp32: the kernel and autograd reduce 51-term log-sum-exps in other orders (~1e-6)
    if not (abs(loss_o - loss_e) <= 1e-4 * max(1.0, abs(loss_o)) and grad_rel <= 1e-3):
        raise AssertionError(f"providers disagree: official loss {loss_o}, engine {loss_e}, "
                             f"relative gradient difference {grad_rel:.3g}")
    echo(f"{case}: official loss {loss_o:.6f} = engine loss {loss_e:.6f} (gradient rel. diff {grad_rel:.2g})")
    bank = engine_bank(size, queues, device)
    gen = torch.Generator(device=device).manual_seed(0)
    official_queues = [q.clone() for q in queues]
    # "fused": the engine's pieces (fused sampled contrast and rank masks on CUDA), named as the
    # other benchmarks' fused provider so that the report compares them alike
    providers = {"fused": lambda: engine_stage(inp, bank, size, generator=gen),
                 "official": lambda: official_stage(inp, official_queues, size)}
    env, rows, medians = stamp(device), [], {}
    for name, step in providers.items():
        n = steps if name == "fused" else max(3, steps // 5)
        ms, syncs, peak = time_provider(step, n, device)
        med, p20, p80 = quantiles(ms)
        medians[name] = med
        rows.append({**env, "op": "u2pl_contrast_stage", "case": case,
                     "dtype": "fp32", "provider": name, "mode": "stage", "ms_median": f"{med:.4f}",
                     "ms_p20": f"{p20:.4f}", "ms_p80": f"{p80:.4f}",
                     "peak_mb": "" if peak is None else f"{peak:.1f}",
                     "host_syncs": "" if syncs is None else str(syncs),
                     "note": f"{n} steps; loss {loss_e:.6g}"})
        echo(f"{name:<9} {med:10.3f} ms [{p20:.3f}, {p80:.3f}]  peak {rows[-1]['peak_mb'] or 'n/a'} MB  "
             f"host syncs/step {rows[-1]['host_syncs'] or 'n/a'}")
    speedup = medians["official"] / medians["fused"]
    rows[0]["note"] += f"; {speedup:.1f}x faster than official"
    echo(f"speedup of the engine over the official-style stage: {speedup:.1f}x")
    if out is not None:
        append_rows(out, rows)
        echo(f"appended {len(rows)} rows to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.bench_u2pl_stage", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed engine steps (official: a fifth, >= 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = None if args.no_csv or args.smoke else results_path(device)
    run("smoke" if args.smoke else "voc", device, args.steps or (10 if args.smoke else 50), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
