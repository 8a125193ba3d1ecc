"""The method interface: a method owns its networks, teachers, memory banks and losses.

The engine drives every method the same way, once per iteration:

0. ``begin_step(step)`` - tells the method the iteration index (a Python int, for schedules that
   change shapes or branches, such as a supervised-only burn-in);
1. ``augment(batch, generator)`` - eager, on the device: strong views, CutMix boxes, anything random
   (kept out of the compiled region, where ``torch.Generator`` objects break graphs), and no-grad
   preparation whose Python arguments change from step to step (U2PL's percentile schedule, memory
   bank writes and index sampling), which would otherwise recompile the captured graph;
2. ``losses(batch, progress)`` - the differentiable part (teacher passes under no-grad, student
   passes, loss terms); it returns a dict of 0-d tensors with the total under ``"loss"``; this is what
   ``torch.compile`` captures on CUDA;
3. backward and the optimizer step (engine);
4. ``after_step(step)`` - no-grad state updates: EMA teachers, memory banks, running statistics.

For the diagnostics the engine logs at every evaluation, ``pseudo_label_report(x, valid)`` says
what the method would teach on whole unlabeled images: the pseudo-labels of its labelling network
and which pixels its confidence rule lets through (``is_confident``). The engine scores them
against the labels of those images, which it holds apart: no method call ever receives them.
``SWITCHES`` names the training outputs that say whether the method's own extra term ran.

Several student/teacher pairs (CTT), memory banks (U2PL, CTT) and graph heads (MLLC) are ordinary
sub-modules and buffers of the method, so ``state_dict`` checkpoints all of them; ``students()``
lists the networks the optimizer trains and ``teachers()`` those kept in eval mode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..collectives import DistEnv
from ..errors import ConfigError
from ..models import build_model
from .common import upsample
from .options import Options

Batch = dict[str, torch.Tensor]


class Method(nn.Module):
    name = "base"
    #: default model preset (``--arch``)
    ARCH = "deeplabv3plus"
    #: the method's own options (a dataclass of ``options.Options``; their paper values are the defaults) ...
    OPTIONS: type[Options] | None = None
    #: ... and the values that differ in the CPU-sized preset for the generated sets (any option)
    SYNTHETIC: dict = {}
    #: whether the engine should draw an unlabeled batch each step
    uses_unlabeled = True
    #: extra unlabeled batches per step (UniMatch's mixing batch), delivered as x_u1, pad_u1, ...
    extra_unlabeled_batches = 0
    #: DDP must look for parameters without a gradient in a step (e.g. a head idle during a burn-in)
    ddp_find_unused_parameters = False
    #: the process group view (set by the engine); single process by default
    dist = DistEnv()
    #: outputs of ``losses`` (float 0-d, > 0 when on) that say the method's extra term ran -> what it is
    SWITCHES: dict[str, str] = {}

    def __init__(self, cfg, num_classes: int):
        # cfg: the run's configuration (``semiseg_fast.config.TrainConfig``, which holds every
        # field of ``OPTIONS`` and the model options), read by attribute only
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.step = 0
        #: labeled images of the split (set by the engine; CTT's bank admission count uses it)
        self.num_labeled: int | None = None

    # -- networks ---------------------------------------------------------------------------
    def build_network(self, **overrides) -> nn.Module:
        kwargs = dict(
            arch=self.cfg.arch,
            num_classes=self.num_classes,
            backbone=self.cfg.backbone,
            output_stride=self.cfg.output_stride,
            deep_stem=self.cfg.deep_stem,
            pretrained=self.cfg.pretrained,
        )
        kwargs.update(overrides)
        try:
            return build_model(**kwargs)
        except (FileNotFoundError, ValueError) as e:
            if not self.cfg.pretrained:
                raise
            lines = str(e).strip().splitlines()  # one line: the cause; the key listing behind --debug
            more = " (the keys: run with --debug)" if len(lines) > 1 else ""
            raise ConfigError(f"--pretrained: {lines[0]}{more}") from e

    @staticmethod
    def make_teacher(student: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def students(self) -> list[nn.Module]:
        return [self.student]

    def teachers(self) -> list[nn.Module]:
        return []

    def eval_model(self) -> nn.Module:
        """The network whose predictions are evaluated and reported."""
        return self.student

    def labeler(self) -> nn.Module:
        """The network whose weak-view predictions are the pseudo-labels."""
        return self.eval_model()

    def is_confident(self, prob: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The confidence rule: bool [B, H, W], the pixels of ``prob`` float [B, C, H, W] (softmax of
        the labeler) whose pseudo-label the unsupervised loss uses; ``valid`` bool [B, H, W]."""
        return (prob.amax(1) >= self.cfg.conf_thresh) & valid

    def report_extras(self, out: dict, prob: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Method-specific diagnostics of the labeler's output ``out``: ``"pred/<name>"`` int64
        [B, H, W] label maps (scored like the pseudo-labels) and float 0-d scalars."""
        return {}

    @torch.no_grad()
    def pseudo_label_report(self, x: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diagnostics only: ``label`` int64 [B, H, W] and ``keep`` bool [B, H, W] (``is_confident``)
        of images ``x`` float [B, 3, H, W] with ``valid`` bool [B, H, W], plus ``report_extras``.
        The labeler runs in eval mode and is put back; no state, RNG or statistic changes."""
        net = self.labeler()
        was_training = net.training
        net.eval()
        try:
            out = net(x)
        finally:
            net.train(was_training)
        prob = upsample(out["logits"], x.shape[-2:]).softmax(1)
        return {"label": prob.argmax(1), "keep": self.is_confident(prob, valid)} | self.report_extras(out, prob, valid)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        backbone, head = [], []
        for net in self.students():
            backbone += list(net.backbone_parameters())
            head += list(net.head_parameters())
        return backbone, head

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self.teachers():
            t.eval()
        return self

    # -- one iteration ------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.step = step

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        return batch

    def losses(self, batch: Batch, progress: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's loss terms, each a float 0-d tensor, the total under ``"loss"``.

        ``batch``: ``x_l`` float [B, 3, H, W] in [0, 1], ``y_l`` int64 [B, H, W] (255 ignored),
        ``x_u`` float [Bu, 3, H, W] and ``pad_u`` bool [Bu, H, W] (True outside the source image),
        plus what ``augment`` added; ``progress`` float32 [] is the fraction of the run done."""
        raise NotImplementedError

    def forward(self, batch: Batch, progress: torch.Tensor) -> dict[str, torch.Tensor]:
        """``losses(batch, progress)`` (``batch`` as there, ``progress`` float32 []): what
        DistributedDataParallel calls, so the loss computation is the module's forward."""
        return self.losses(batch, progress)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        pass
