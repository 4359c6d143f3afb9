"""Masked inference: the evaluation with the training policy's masking applied to the test images.

FLIP evaluates its models three ways (Table 1d of the paper): on the intact images, on one masked view of
each, and on an ensemble of masked views. `evaluation.masked.views: [1, 4]` adds the second and third
beside the first for every evaluated model: one masked view, and the mean of 4 masked views' unit-norm
embeddings, each view drawn by the run's own policy (`model.masking`: random cells for random masking,
the cells its EMA teacher attends to for an attentive policy, the image's own pixels for cluster masking,
a smaller image for CLIPA's resize). Their figures go to metrics.json beside the unmasked ones, under the
set's name with `@masked<n>` (`zeroshot/imagenet@masked4/top1` beside `zeroshot/imagenet/top1`), and so
to the sweep summary's columns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aclip.errors import ConfigError
from aclip.evaluation.suite import Metrics
from aclip.modules.masking import TokenMasking
from aclip.modules.model import ClipModel
from aclip.modules.vision import Layers, VisionTower
from aclip.specs import is_integer

log = logging.getLogger(__name__)

# A model seeing masked views is evaluated as `<model><MASKED>`; its set names get the same suffix.
MASKED = "@masked"


class TeacherScores(nn.Module):
    """A teacher's CLS-attention scores [B, gh * gw] of a batch of images over the blocks `layers`, computed
    once for all the models that mask the same batch (the evaluation hands each model the same tensor)."""

    def __init__(self, teacher: VisionTower, layers: Layers = "all") -> None:
        super().__init__()
        self.teacher, self.layers = teacher, layers
        self._images: Tensor | None = None
        self._scores: Tensor | None = None

    def forward(self, images: Tensor) -> Tensor:
        if images is not self._images:
            self._scores = self.teacher.forward_with_cls_attention(images, layers=self.layers)[1]
            self._images = images
        return self._scores


class MaskedViews(nn.Module):
    """`model` seeing its images through `policy`: `encode_image` keeps the patches `policy` chooses in each
    of `views` masked views of every image (scored by `teacher`'s CLS attention on the same images when it
    reads scores, through `scores` where several models share them; its pixels when it reads them) and
    averages their unit-norm embeddings; texts are unchanged. The masks of a batch come from a generator
    seeded by `seed` and the batch's position, so every model evaluated alike sees the same ones. The
    wrapper's mode is its model's; the teacher keeps its own (an EMA teacher is always in eval mode)."""

    def __init__(
        self,
        model: ClipModel,
        policy: TokenMasking,
        teacher: VisionTower,
        views: int = 1,
        seed: int = 0,
        scores: TeacherScores | None = None,
    ) -> None:
        super().__init__()
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.model, self.policy, self.views, self.seed = model, policy, views, seed
        self.scores = TeacherScores(teacher, policy.layers) if scores is None else scores
        self.logit_scale = model.logit_scale
        self.training = model.training
        self._batches = 0

    def train(self, mode: bool = True) -> MaskedViews:
        self.training = mode
        self.model.train(mode)
        return self

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        views = self.policy.prepare_views(images, self.model.vision.patch_size)
        grid = self.model.vision.grid(*views.shape[-2:])
        scores = self.scores(images) if self.policy.needs_scores else None
        generator = torch.Generator(images.device).manual_seed(self.seed + self._batches)
        self._batches += 1
        embeddings = []
        for _ in range(self.views):
            keep = self.policy.select(
                scores, grid, len(images), device=images.device, generator=generator, pixels=views
            )
            embeddings.append(self.model.encode_image(views, keep, normalize=self.views > 1))
        if self.views == 1:
            return F.normalize(embeddings[0], dim=-1) if normalize else embeddings[0]
        mean = torch.stack(embeddings).mean(dim=0)
        return F.normalize(mean, dim=-1) if normalize else mean

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return self.model.encode_text(tokens, normalize=normalize)


def masked_views(settings: Mapping | None) -> list[int]:
    """The `views` of an `evaluation` config node's `masked` setting, checked: a list of integers >= 1
    (null: none); a `ConfigError` naming the key otherwise."""
    views = ((settings or {}).get("masked") or {}).get("views")
    if views is None:
        return []
    if (
        isinstance(views, str)
        or not isinstance(views, Sequence)
        or not all(is_integer(n) and n >= 1 for n in views)
    ):
        raise ConfigError(
            f"evaluation.masked.views must be null or a list of view counts >= 1 (e.g. [1,4]), got {views!r}"
        )
    return list(views)


def keeps_every_token(policy: TokenMasking, image_size: int, patch_size: int) -> bool:
    """Whether `policy` shows the encoder the whole image (no masking, full resolution)."""
    side = policy.view_size(image_size, patch_size)
    grid = (side // patch_size, side // patch_size)
    return side == image_size and policy.num_keep(grid) == grid[0] * grid[1]


def with_masked_views(
    models: Mapping[str, ClipModel], policy: TokenMasking, teacher: VisionTower, views: Sequence[int]
) -> dict[str, nn.Module]:
    """`models` and, for each n of `views`, each of them seeing n masked views (`<model>@masked<n>`); just
    `models` for a policy that keeps every token."""
    if not views or keeps_every_token(policy, teacher.image_size, teacher.patch_size):
        if views:
            log.info("Masked evaluation skipped: the run's masking %r keeps every token", policy)
        return dict(models)
    scores = TeacherScores(teacher, policy.layers)
    masked = {
        f"{name}{MASKED}{count}": MaskedViews(model, policy, teacher, count, scores=scores)
        for count in views
        for name, model in models.items()
    }
    return {**models, **masked}


def fold_masked(metrics: Metrics) -> Metrics:
    """The metrics of each `<model>@masked<n>` as its model's, each key's set named `<set>@masked<n>`
    (`zeroshot/synthetic@masked4/top1`), so that they sort beside the unmasked figures."""
    folded: Metrics = {name: dict(values) for name, values in metrics.items() if MASKED not in name}
    for name, values in metrics.items():
        if MASKED in name:
            model, count = name.split(MASKED)
            for key, value in values.items():
                kind, dataset, metric = key.split("/", 2)
                folded[model][f"{kind}/{dataset}{MASKED}{count}/{metric}"] = value
    return folded
