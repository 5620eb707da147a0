"""The four training stages, one object each: the module that trains, the checkpoint it starts
from, how its model and loss are built, and its loss on a micro-batch.

DVIS++ training chain (DVIS++ sec. 3; DVIS_Plus ``dvis_Plus/meta_architecture.py``), each stage
starting from the previous stage's checkpoint (``train.py --init``):
- ``segmenter`` (stage 1): Mask2Former on the B*T frames of the clips, per-frame targets, and
  with ``LossConfig.ctvis`` (the r50/vitl presets, as DVIS++'s VSPW segmenters) CTVIS's contrastive
  loss on the reid embeddings across the clip's frames (``vss/ctvis.py``); without it MinVIS-style,
  the reid head frozen.
- ``tracker`` (stage 2): the segmenter frozen; guided matching on the segmenter's outputs while
  the 0-based iteration is < iters // 2 (DVIS_Plus ``DVIS_Plus_online``: ``iter < MAX_ITER // 2``),
  the tracker's own outputs after.
- ``refiner`` (stage 3): segmenter and tracker frozen; guided matching on the tracker's outputs in
  the first half.
- ``semi`` (PVUW 2024 1st place + U2PL, ``vss/semi_stage.py``): fine-tunes the segmenter of a
  student checkpoint of any stage; its tracker/refiner stay frozen, so the model keeps its stage
  for inference.
With MVC (``Config.mvc``) the segmenter/tracker/refiner losses add the masked-frames pass
(``vss/mvc.py``); in stages 2/3 the frozen parts see the masked frames too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn, Tensor

from vss.config import Config
from vss.criterion import SetCriterion
from vss.matcher import HungarianMatcher
from vss.mvc import mvc_settings
from vss.semi_stage import progress, SemiLoss, SemiStudent
from vss.video_model import build_video_model, video_loss, VideoModel


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: the ``--stage`` value.
        trains: the ``VideoModel`` module whose parameters train; every other module is frozen.
        needs: what ``--init`` must give (None: the stage can start from scratch).
        build: (config, the model's stage) -> (trainable module, loss module).
        loss: (model as called, loss module, batch on the device, 1-based step, config) -> the
            weighted loss terms of one micro-batch.
    """

    name: str
    trains: str
    needs: str | None
    build: Callable[[Config, str], tuple[nn.Module, nn.Module]]
    loss: Callable[[nn.Module, nn.Module, dict, int, Config], dict[str, Tensor]]

    def model_stage(self, source_stage: str | None) -> str:
        """The VideoModel stage of the run: the stage itself, or for semi the student's stage."""
        if self.name != "semi":
            return self.name
        if source_stage is None:
            raise ValueError("--stage semi starts from a student: pass --init CHECKPOINT")
        return source_stage


def set_criterion(cfg: Config) -> SetCriterion:
    """Mask2Former's set criterion (CE + point BCE + dice, deep supervision) of ``cfg.loss``."""
    return SetCriterion(cfg.model.num_classes, HungarianMatcher.from_config(cfg.loss), cfg.loss)


def video_core(model: nn.Module) -> VideoModel:
    """The VideoModel inside a stage's trainable module (evaluated, saved as ``model``)."""
    return model.model if isinstance(model, SemiStudent) else model


def _guided(step: int, cfg: Config) -> bool:
    """Guided matching of stages 2/3 (DVIS++: while the 0-based iteration < MAX_ITER // 2); stage 1
    ignores it."""
    return step - 1 < cfg.optim.iters // 2


# --- stages 1-3 ------------------------------------------------------------------------------


def _build_segmenter(cfg: Config, model_stage: str) -> tuple[nn.Module, nn.Module]:
    model = build_video_model(cfg, "segmenter")
    if not cfg.loss.ctvis:
        # MinVIS-style stage 1 (no contrastive reid loss): the reid head gets no gradient. Freeze it
        # so DDP needs no unused-parameter search and weight decay does not shrink it.
        model.segmenter.transformer_decoder.reid_embed.requires_grad_(False)
    return model, set_criterion(cfg)


def _build_video(cfg: Config, model_stage: str) -> tuple[nn.Module, nn.Module]:
    return build_video_model(cfg, model_stage), set_criterion(cfg)


def _video_loss(model: nn.Module, criterion: nn.Module, batch: dict, step: int, cfg: Config) -> dict:
    """The stage's set (and reid) losses, + the MVC term on masked frames when enabled."""
    return video_loss(model, batch, criterion, guided=_guided(step, cfg), mvc=mvc_settings(cfg))


# --- semi-supervised -------------------------------------------------------------------------


def _build_semi(cfg: Config, model_stage: str) -> tuple[nn.Module, nn.Module]:
    """SemiStudent (the student VideoModel + representation head) and the U2PL loss (set
    criterion, EMA teacher, memory bank). Call ``teacher.copy_from`` after loading the student."""
    student = SemiStudent(build_video_model(cfg, model_stage), cfg.model.mask_dim)
    s = cfg.semi
    loss = SemiLoss(
        set_criterion(cfg),
        student,
        cfg.model.num_classes,
        unsup_weight=s.unsup_weight,
        contrastive_weight=s.contrastive_weight,
        drop_base=s.drop_percent,
        alpha_base=s.entropy_alpha,
        ema_max_decay=s.ema_decay,
        queue_size=s.bank_size,
        cutmix=s.cutmix,
    )
    return student, loss


def _semi_loss(model: nn.Module, criterion: nn.Module, batch: dict, step: int, cfg: Config) -> dict:
    """PVUW Eq. (3) on one labelled + one pseudo-labelled micro-batch."""
    return criterion(model, batch["labelled"], batch["unlabelled"], progress(step, cfg.optim.iters))


STAGES = {
    s.name: s
    for s in (
        Stage("segmenter", trains="segmenter", needs=None, build=_build_segmenter, loss=_video_loss),
        Stage("tracker", trains="tracker", needs="a segmenter", build=_build_video, loss=_video_loss),
        Stage("refiner", trains="refiner", needs="a tracker", build=_build_video, loss=_video_loss),
        Stage("semi", trains="segmenter", needs="a student (any stage)", build=_build_semi, loss=_semi_loss),
    )
}
