"""The LightningModule: contrastive image-text pre-training with token removal."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor, nn

from aclip.evaluation.report import flatten_metrics
from aclip.evaluation.suite import Evaluation, FeatureBank, split_batch
from aclip.initialize import load_initial_weights
from aclip.modules.losses import ClipLoss
from aclip.modules.masking import TokenMasking, build_policy, generator_on
from aclip.modules.model import ClipModel, l2_normalize
from aclip.modules.object_metrics import object_diagnostics
from aclip.modules.schedule import build_optimizer, check_recipe, configure_optimization
from aclip.modules.score_geometry import kept_score_mass, map_scores_to_views
from aclip.modules.self_supervision import SelfSupervision
from aclip.modules.stages import Phase, build_phases, flops_until, phase_at, phase_ends
from aclip.modules.teacher_warmup import TeacherWarmup
from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower
from aclip.specs import SpecError, check_plain
from aclip.tokenizer import build_tokenizer

log = logging.getLogger(__name__)

# Where a checkpoint keeps the teacher warm-up's state (its running loss and hand-over step).
TEACHER_WARMUP_KEY = "aclip_teacher_warmup"


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain Python, so checkpoints hold no pickled config objects."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class AClip(pl.LightningModule):
    """CLIP trained on token-reduced images.

    Args:
        vision: keyword arguments of `VisionTower` (output_dim is `embed_dim`).
        text: keyword arguments of `TextTower` (output_dim is `embed_dim`).
        optimizer: node (`_target_` a `torch.optim` class, `_partial_: true`) of the optimizer over
            the online model; biases, norms, other 1-D parameters and the logit scale get no weight decay.
        scheduler: node (`_target_` a `LearningRateSchedule`) of the learning rate per optimizer step.
        embed_dim: size of the joint image-text embedding.
        masking: Hydra node (with `_target_`) of a `TokenMasking` policy; None keeps every token.
        init_logit_scale: initial logit scale, ln(1/T) for the temperature T = 0.07, as in CLIP.
        eval_model: the model whose evaluation is reported first and logged as `eval/...`:
            "ema" (the paper's choice) or "online".
        seed: base seed of the masking policies' random generator, combined with rank and step.
        self_supervision: keyword arguments of `SelfSupervision` (view loss, BYOL, weights, heads);
            None or empty for CLIP alone.
        grad_checkpointing: recompute the online towers' block activations in the backward pass
            (less memory, about one more forward pass of compute).
        compile: `torch.compile` the online towers (in place, so checkpoint keys are unchanged).
        phases: the phases of the run, each its length and masking (`aclip.modules.stages`); None: one
            phase of `masking`.
        auxiliary_after_warmup: leave the self-supervised terms out of the loss until the teacher
            warm-up has ended (with `teacher_warmup_until_loss`: until the student has left the
            plateau), so that they do not steer the towers alone while the CLIP loss idles.

    The EMA copy `ema_model` of the whole CLIP model is excluded from the optimizer, saved in
    checkpoints, moved by the `EMAUpdate` callback, and scores patches for attentive masking.
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        embed_dim: int = 512,
        masking: Mapping[str, Any] | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        eval_model: str = "ema",
        seed: int | None = 0,
        self_supervision: Mapping[str, Any] | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        teacher_warmup_steps: int = 0,
        teacher_warmup_until_loss: float | None = None,
        teacher_warmup_max_steps: int | None = None,
        phases: Sequence[Mapping[str, Any]] | None = None,
        auxiliary_after_warmup: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        vision, text, masking, phases = _plain(vision), _plain(text), _plain(masking), _plain(phases)
        optimizer, scheduler = _plain(optimizer), _plain(scheduler)
        self_supervision = _plain(self_supervision)
        # Where the towers' initial weights come from is not part of the model's description.
        vision, text = dict(vision), dict(text)
        vision_init_from, text_init_from = vision.pop("init_from", None), text.pop("init_from", None)
        # The towers' and heads' arguments are plain values (a checkpoint's hyper-parameters are data).
        for key, value in (("vision", vision), ("text", text), ("self_supervision", self_supervision)):
            check_plain(value or {}, key)
        # `init_from` only starts a run: a checkpoint of it holds the weights, not where they came from.
        self.save_hyperparameters(ignore=["init_from"])
        check_recipe(optimizer, scheduler)
        self.model = ClipModel(
            VisionTower(**vision, output_dim=embed_dim, init_from=vision_init_from),
            TextTower(**text, output_dim=embed_dim, init_from=text_init_from),
            init_logit_scale=init_logit_scale,
        )
        if eval_model not in ("ema", "online"):
            raise ValueError(f'eval_model must be "ema" or "online", got {eval_model!r}')
        if init_from is not None:
            load_initial_weights(self.model, init_from)  # before the EMA copy: the teacher starts equal
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.model.vision.set_grad_checkpointing(grad_checkpointing)
        self.model.text.set_grad_checkpointing(grad_checkpointing)
        # Built from this project's own policy classes only: a checkpoint's hyper-parameters are data.
        self.masking: TokenMasking = build_policy(masking)
        self.phases: list[Phase] = build_phases(phases, masking, self.masking)
        # Reject a policy that cannot work on this tower now, not at the first training step.
        for phase in self.phases:
            if phase.masking.needs_scores:
                self.model.vision.resolve_layers(phase.masking.layers)
        # While the teacher is still forming, a policy it scores keeps random cells of the same budget.
        self.teacher_warmup = TeacherWarmup(
            teacher_warmup_steps, teacher_warmup_until_loss, teacher_warmup_max_steps
        )
        self._warmup_masking = [phase.warmup_masking for phase in self.phases]
        self._teacher_chooses = any(policy is not None for policy in self._warmup_masking)
        # Where each phase ends, once the run's length is known (`on_train_start`).
        self.phase_ends: list[int] | None = None
        # FLOPs of one training batch on one device in each phase, counted before training
        # (`aclip.compute`); None where nobody counted them.
        self.phase_batch_flops: list[int] | None = None
        self.clip_loss = ClipLoss()
        self.self_supervision = SelfSupervision(
            embed_dim, cls_dim=self.model.vision.width, **(self_supervision or {})
        )
        if not isinstance(auxiliary_after_warmup, bool):
            raise ValueError(f"auxiliary_after_warmup must be true or false, got {auxiliary_after_warmup!r}")
        # The self-supervised terms wait for the same label-free signal as the teacher.
        self._auxiliary_waits = auxiliary_after_warmup and self.self_supervision.has_terms
        self.tokenizer = build_tokenizer(self.model.text.context_length)
        self._mask_generator: torch.Generator | None = None
        self._validation_features: FeatureBank | None = None
        # Wall time spent in validation during `fit` (the learning curves), left out of the step time.
        self.validation_seconds = 0.0
        self._validation_started = 0.0

    def train(self, mode: bool = True) -> AClip:
        super().train(mode)
        # The teacher never uses dropout or drop-path. (The EMA BYOL projector follows the module's mode:
        # in training its batch norms use the batch's statistics, as A-CLIP's.)
        self.ema_model.eval()
        return self

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.model.vision.compile()
            self.model.text.compile()

    @staticmethod
    def check_hparams(hparams: Any) -> None:
        """Reject a description (a checkpoint's `hyper_parameters`) that is not plain data, names a
        masking policy this project does not define, or names files to read weights from (`init_from`:
        a checkpoint holds its weights, never where they came from) with a `SpecError`, without building
        anything large."""
        if not isinstance(hparams, Mapping):
            raise SpecError(f"the hyper-parameters must be a mapping, got {type(hparams).__name__}")
        for key, node in (
            ("init_from", hparams),
            *((f"{tower}.init_from", hparams.get(tower)) for tower in ("vision", "text")),
        ):
            source = node.get("init_from") if isinstance(node, Mapping) else None
            if source is not None:
                raise SpecError(
                    f"{key}={source!r}: a checkpoint's description names a file to read weights from, which "
                    "aclip never writes there (the checkpoint holds its weights)"
                )
        components = ("masking", "phases", "optimizer", "scheduler")
        check_plain(
            {key: value for key, value in hparams.items() if key not in components}, "hyper_parameters"
        )
        build_phases(hparams.get("phases"), hparams.get("masking"))
        if "optimizer" in hparams and "scheduler" in hparams:  # else the constructor names what is missing
            check_recipe(hparams["optimizer"], hparams["scheduler"])

    def on_train_start(self) -> None:
        # A resumed run restores the optimizer's and the scheduler's settings along with their state. It
        # follows this run's configuration instead (a lower model.optimizer.lr after a NaN stop, say),
        # keeping the moments and the step; for a new run this changes nothing.
        optimizer = self.trainer.optimizers[0]
        scheduler = self.trainer.lr_scheduler_configs[0].scheduler
        # This run's settings: the optimizer its config makes (no state until it steps).
        configured = build_optimizer(self.hparams.optimizer, self.parameters()).param_groups
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update({key: value for key, value in settings.items() if key != "params"})
            group["initial_lr"] = settings["lr"]  # `lr` itself is set to the step's value below
        scheduler.base_lrs = [settings["lr"] for settings in configured]
        lrs = [
            base * factor(scheduler.last_epoch)
            for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
        total_steps = int(self.trainer.estimated_stepping_batches)
        self.phase_ends = phase_ends(self.phases, total_steps)
        if self._teacher_chooses:
            self._report(self.teacher_warmup.inside_warmup(total_steps))

    def on_train_end(self) -> None:
        if self._teacher_chooses:
            self._report(self.teacher_warmup.never_handed_over(self.global_step))
        if self.in_auxiliary_warmup:
            self._report(
                f"the self-supervised terms never joined the loss in this run's {self.global_step} optimizer "
                "steps (model.auxiliary_after_warmup=true): the warm-up they wait for never ended, so the "
                "run trained with the CLIP loss alone"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TEACHER_WARMUP_KEY] = self.teacher_warmup.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TEACHER_WARMUP_KEY in checkpoint:  # checkpoints written before the adaptive warm-up have none
            self.teacher_warmup.load_state_dict(checkpoint[TEACHER_WARMUP_KEY])

    @staticmethod
    def _report(warning: str | None) -> None:
        """Log `warning` (on rank zero) to the console and the run's log file."""
        if warning is not None:
            rank_zero_only(log.warning)(warning)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Any]:
        step = self.forward_step(batch, self.phase, self.masking_policy, self.mask_generator(batch_idx))
        batch_size = batch["images"].shape[0]
        self._log_step(step, batch_size)
        if self._teacher_chooses or self._auxiliary_waits:  # the loss tells when the warm-up ends
            lock_in = self.teacher_warmup.observe(
                self.global_step, step["clip_loss"], batch_size * self.trainer.world_size
            )
            if self._teacher_chooses:  # a lock-in needs a teacher that chooses the kept cells
                self._report(lock_in)
        if "object_masks" in batch:  # the built-in data knows where its objects are
            self._log_object_diagnostics(batch, step, batch_size)
        # The loss, and what the step showed the encoders, for callbacks (the mask pictures).
        return {key: step[key] for key in ("loss", "views", "num_views", "keep", "grid", "score_map")}

    def forward_step(
        self,
        batch: Mapping[str, Tensor],
        phase: Phase,
        selection: TokenMasking,
        generator: torch.Generator | None,
    ) -> dict[str, Any]:
        """One training batch's losses in `phase`, the kept tokens chosen by `selection` (the phase's
        policy, or what stands in for it: `masking_policy`), and what the encoders saw."""
        images, text = batch["images"][:, : phase.views], batch["text"]  # [B, k, 3, H, W], [B, L]
        batch_size, num_views = images.shape[:2]
        views = phase.masking.prepare_views(images.flatten(0, 1), self.model.vision.patch_size)
        grid = self.model.vision.grid(*views.shape[-2:])

        # 1. One EMA pass over the crop enclosing all views: its features and patch scores.
        ema_features, score_map = self.ema_pass(batch.get("ema_image"), phase.masking)
        # 2. Each view reads its patch scores from the shared map, over its box in the enclosing crop.
        boxes = batch["boxes"][:, :num_views]
        scores = map_scores_to_views(score_map, boxes, grid) if score_map is not None else None
        # 3. The masking policy decides which patch tokens the online encoder keeps in each view.
        keep = selection.select(
            scores, grid, batch_size * num_views, device=self.device, generator=generator, pixels=views
        )
        # 4. The online encoders: every view of the batch through the vision tower in one call.
        cls_tokens, view_embeddings = self.model.vision(views, keep, return_cls_token=True)
        view_embeddings = view_embeddings.unflatten(0, (batch_size, num_views))
        image_features = l2_normalize(view_embeddings)
        text_features = self.model.encode_text(text, normalize=True)

        # 5. CLIP loss of each view against the captions, averaged over views, plus the auxiliary losses
        # (a view loss only where the phase has the views it compares).
        logit_scale = self.model.logit_scale
        clip_loss = torch.stack(
            [self.clip_loss(image_features[:, v], text_features, logit_scale) for v in range(num_views)]
        ).mean()
        ssl_inputs = view_embeddings
        if self.self_supervision.source == "cls_token":
            ssl_inputs = cls_tokens.unflatten(0, (batch_size, num_views))
        compares = num_views >= self.self_supervision.views_compared
        auxiliary = self.self_supervision(ssl_inputs, ema_features, view_loss=compares)
        # While they wait for the warm-up, the auxiliary terms are weighted 0 (not skipped: every
        # parameter still takes part in the backward pass, as DDP expects).
        auxiliary_weight = 0.0 if self.in_auxiliary_warmup else 1.0
        return {
            "loss": clip_loss + auxiliary_weight * sum(auxiliary.values()),
            "clip_loss": clip_loss,
            "auxiliary": auxiliary,
            "views": views,
            "num_views": num_views,
            "keep": keep,
            "grid": grid,
            "scores": scores,
            "score_map": score_map,
        }

    @property
    def phase_index(self) -> int:
        """The index of the phase in force at this optimizer step (the first before training starts)."""
        return 0 if self.phase_ends is None else phase_at(self.phase_ends, self.global_step)

    @property
    def phase(self) -> Phase:
        """The phase in force at this optimizer step (`aclip.modules.stages`)."""
        return self.phases[self.phase_index]

    @property
    def masking_policy(self) -> TokenMasking:
        """The policy of this step: the phase's, or, while the teacher warm-up lasts, random cells of its
        budget when the phase's policy reads the teacher's scores (`aclip.modules.teacher_warmup`)."""
        index = self.phase_index
        return self._warmup_masking[index] if self.in_teacher_warmup else self.phases[index].masking

    @property
    def in_teacher_warmup(self) -> bool:
        """Whether this step's cells are random instead of the teacher's: during the warm-up, in a phase
        whose policy the teacher scores (never in others)."""
        scored = self._warmup_masking[self.phase_index] is not None
        return scored and not self.teacher_warmup.teacher_active(self.global_step)

    @property
    def in_auxiliary_warmup(self) -> bool:
        """Whether this step's loss leaves the self-supervised terms out (`auxiliary_after_warmup`)."""
        return self._auxiliary_waits and not self.teacher_warmup.teacher_active(self.global_step)

    def token_choice(self) -> dict[str, int | None]:
        """For a run with a policy the teacher scores: `teacher_handover_step`, the first optimizer step
        whose kept cells the teacher may choose (None if that never came before the run's last step);
        else nothing."""
        if not self._teacher_chooses:
            return {}
        handover = self.teacher_warmup.handover_step
        return {
            "teacher_handover_step": handover
            if handover is not None and handover < self.global_step
            else None
        }

    @property
    def needs_teacher_crop(self) -> bool:
        """Whether training reads the batch's `ema_image` (the crop enclosing the views)."""
        return self._teacher_chooses or self.self_supervision.uses_ema

    @torch.no_grad()
    def ema_pass(
        self, ema_image: Tensor | None, policy: TokenMasking | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The EMA model's features of the EMA view, as the auxiliary heads read them (its CLS token
        [B, width] or its embedding [B, D], `self_supervision.source`), and its patch-score map
        [B, gh, gw] for `policy` (default: `masking`). Each is None when neither the policy nor the
        auxiliary losses need it.
        """
        policy = self.masking if policy is None else policy
        needs_scores = policy.needs_scores
        if not (needs_scores or self.self_supervision.uses_ema):
            return None, None
        if ema_image is None:
            raise ValueError("this masking policy or BYOL needs the batch's `ema_image` (the enclosing crop)")
        vision = self.ema_model.vision
        project = self.self_supervision.source == "embedding"
        if not needs_scores:
            return (vision(ema_image) if project else vision.cls_features(ema_image)), None
        features, scores = vision.forward_with_cls_attention(ema_image, layers=policy.layers, project=project)
        return features, scores.unflatten(1, vision.grid(*ema_image.shape[-2:]))

    def _log_step(self, step: Mapping[str, Any], batch_size: int) -> None:
        # The progress bar shows the loss and the learning rate; everything else goes to the loggers.
        trainer, keep, scores = self.trainer, step["keep"], step["scores"]
        progress = {"train/loss": step["loss"], "train/lr": trainer.optimizers[0].param_groups[0]["lr"]}
        logs = {
            "train/clip_loss": step["clip_loss"],
            **{f"train/{name}_loss": value for name, value in step["auxiliary"].items()},
            "train/logit_scale": self.model.logit_scale.detach(),
            "train/kept_tokens": float(keep.shape[1]),
        }
        if scores is not None:
            logs["train/kept_score_mass"] = kept_score_mass(scores, keep).mean()
        if self._teacher_chooses:
            logs["train/teacher_active"] = float(self.teacher_warmup.teacher_active(self.global_step))
        if self._auxiliary_waits:
            logs["train/auxiliary_active"] = float(not self.in_auxiliary_warmup)
        if len(self.phases) > 1:
            logs["train/phase"] = float(self.phase_index)
        if self.phase_batch_flops is not None:  # what the run has spent, this step included
            devices = trainer.world_size * trainer.accumulate_grad_batches
            step_flops = [flops * devices for flops in self.phase_batch_flops]
            logs["train/flops"] = float(flops_until(self.phase_ends, step_flops, self.global_step + 1))
        self.log_dict(progress, prog_bar=True, batch_size=batch_size)
        self.log_dict(logs, batch_size=batch_size)

    def _log_object_diagnostics(
        self, batch: Mapping[str, Tensor], step: Mapping[str, Any], batch_size: int
    ) -> None:
        object_masks = batch["object_masks"][:, : step["num_views"]]  # the phase's views
        with torch.no_grad():
            metrics = object_diagnostics(
                object_masks, step["keep"], step["grid"], step["score_map"], batch.get("ema_object_mask")
            )
        self.log_dict({f"train/{name}": value for name, value in metrics.items()}, batch_size=batch_size)

    # -- Learning curves: the `eval` group's sets as Lightning validation (see ClipDataModule.val_dataloader)

    def _evaluation(self) -> Evaluation:
        evaluation = getattr(self.trainer.datamodule, "evaluation", None)
        if evaluation is None:
            raise RuntimeError(
                "validation needs the datamodule's evaluation suite (ClipDataModule.evaluation)"
            )
        return evaluation

    def on_validation_epoch_start(self) -> None:
        self._validation_features = self._evaluation().feature_bank()
        self._validation_started = time.perf_counter()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = split_batch(batch)
        self._validation_features.add(dataloader_idx, self.eval_models(), images, labels)

    def on_validation_epoch_end(self) -> None:
        features, self._validation_features = self._validation_features, None
        self.validation_seconds += time.perf_counter() - self._validation_started
        if self.trainer.fast_dev_run:
            return  # it ran one batch of each set: the code path is checked, there is nothing to score
        metrics = self._evaluation().score(self.eval_models(), self.tokenizer, features)
        # Every rank holds the same gathered figures, so nothing is reduced.
        self.log_dict(flatten_metrics(metrics, "val"), sync_dist=False)

    def summary(self) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """The model's parts by name and a few facts about its training, for the start-up summary."""
        parts: dict[str, nn.Module] = {
            "online image tower": self.model.vision,
            "online text tower": self.model.text,
            "EMA teacher (both towers)": self.ema_model,
        }
        if self.self_supervision.has_terms:
            parts["self-supervised heads"] = self.self_supervision
        grid = self.model.vision.grid(self.model.vision.image_size)
        notes = {
            "masking": repr(self.masking),
            "patch tokens per view": f"{self.kept_tokens(self.phases[0])} of {grid[0] * grid[1]}",
        }
        if len(self.phases) > 1:
            notes |= {
                f"phase {index}": f"{phase.describe()}, {self.kept_tokens(phase)} patch tokens per view"
                for index, phase in enumerate(self.phases)
            }
        return parts, notes

    def kept_tokens(self, phase: Phase) -> int:
        """The patch tokens the online image encoder keeps of each view in `phase`."""
        vision, policy = self.model.vision, phase.masking
        return policy.num_keep(vision.grid(policy.view_size(vision.image_size, vision.patch_size)))

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA module, online module) pairs that the EMA callback moves."""
        return [(self.ema_model, self.model), *self.self_supervision.ema_pairs()]

    def mask_generator(self, batch_idx: int) -> torch.Generator:
        """The masking policies' random generator, on this device, reseeded from (seed, rank, step).

        Runs are reproducible, ranks draw different masks, and a resumed run draws what it would have.
        """
        if self._mask_generator is None or self._mask_generator.device != self.device:
            self._mask_generator = generator_on(self.device)
        entropy = [self.hparams.seed or 0, self.global_rank, self.global_step, batch_idx]
        self._mask_generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return self._mask_generator

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.clamp_logit_scale()

    def configure_optimizers(self) -> dict[str, Any]:
        # The EMA copies have requires_grad False, so the optimizer holds the online model alone.
        return configure_optimization(
            self.parameters(), self.hparams.optimizer, self.hparams.scheduler, self.trainer
        )

    def eval_models(self) -> dict[str, nn.Module]:
        """The models the final evaluation reports, by name, the reported one (`eval_model`) first."""
        models = {"ema": self.ema_model, "online": self.model}
        reported = self.hparams.eval_model
        return {reported: models[reported], **models}
