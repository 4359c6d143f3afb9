"""bf16-mixed on the CPU: every method preset trains, and the numbers that decide or score run in float32.

Lightning's `precision="bf16-mixed"` autocasts on the CPU too, so the bf16 path of a GPU run executes here.
The precision policy (the same on every device; autocast's own op lists differ, e.g. CUDA's runs softmax and
norms in float32, the CPU's in bf16):
- the towers' matmuls, attention and MLPs in bf16 (autocast);
- the teacher's CLS-attention row, its softmax and the score map in float32, and the kept-token choice on
  float32 cell scores (`vision._block_with_cls_attention`, `masking._cell_scores`);
- the embeddings L2-normalised in float32 (`model.l2_normalize`), the logit scale a float32 parameter, the
  CLIP logits and cross-entropy in float32 (`ClipLoss.logits`), as the SimCLR, SimSiam and BYOL terms
  already were.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import Tensor

from aclip.modules.losses import ClipLoss
from aclip.modules.masking import AttentiveHigh, AttentiveLow
from aclip.modules.model import ClipModel
from aclip.modules.score_geometry import map_scores_to_views
from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower
from benchmarks.variants import attach_barebones_trainer
from tests.helpers import CONF_DIR

PRESETS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
# In the default suite: plain CLIP, two random views, A-CLIP (attentive views, the teacher, SimCLR and BYOL)
# and the resized views; the other presets (`slow`) differ from these in numbers or in the policy alone.
TRAINED = ("clip", "random_2x50", "aclip", "clipa_resize")
# Ranking policies (ties possible) and one random draw in the default suite.
COMPARED = ("aclip", "attentive_high", "attentive_mixed", "random_2x50")
STEPS = 3
# A kept cell may differ from float32's only if both runs' choices are ties: its float32 score within 1 %
# of the boundary between kept and dropped scores. bf16 keeps 8 significant bits (steps of 0.4 %) of the
# teacher's q and k; the scores then move by far less (2e-4 relative on the tiny model).
TIE_TOLERANCE = 0.01


class StepRecord(pl.Callback):
    """Each training step's loss, score map and kept tokens, and what reached the CLIP loss."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.clip_inputs: list[tuple[torch.dtype, ...]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(module, args):  # image features, text features, logit scale
            self.clip_inputs.append(tuple(arg.dtype for arg in args))

        pl_module.clip_loss.register_forward_pre_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({key: outputs[key] for key in ("loss", "score_map", "keep")})


def presets(default: tuple[str, ...]) -> list[Any]:
    """Every method preset, those not in `default` marked `slow`."""
    return [p if p in default else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS]


@pytest.mark.parametrize("preset", presets(TRAINED))
def test_bf16_mixed_trains_every_method_preset(train_config, preset):
    cfg = train_config(f"method={preset}", "callbacks.model_checkpoint=null")
    pl.seed_everything(0, verbose=False)
    module, record = instantiate(cfg.model), StepRecord()
    trainer = instantiate(
        cfg.trainer,
        precision="bf16-mixed",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        callbacks=[instantiate(cfg.callbacks.ema), record],
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))

    assert len(record.steps) == STEPS
    assert all(math.isfinite(step["loss"].item()) for step in record.steps)
    assert all(step["loss"].dtype == torch.float32 for step in record.steps)
    score_maps = [step["score_map"] for step in record.steps if step["score_map"] is not None]
    assert all(score_map.dtype == torch.float32 for score_map in score_maps)
    assert bool(score_maps) == module.masking.needs_scores
    # Normalised features and the logit scale reach the CLIP loss in float32, once per view.
    assert record.clip_inputs == [(torch.float32,) * 3] * (STEPS * cfg.data.num_views)


def kept_cells(keep: Tensor, grid: tuple[int, int], unit: int) -> list[set[int]]:
    """Each row's kept cells (row-major over the unit x unit cells) of patch indices `keep`."""
    rows, cols = keep // grid[1] // unit, keep % grid[1] // unit
    return [set(row) for row in (rows * (grid[1] // unit) + cols).tolist()]


def cell_scores(scores: Tensor, grid: tuple[int, int], unit: int) -> Tensor:
    """Mean patch score of each unit x unit cell: [N, gh * gw] -> [N, cells]."""
    return scores.reshape(-1, grid[0] // unit, unit, grid[1] // unit, unit).mean(dim=(2, 4)).flatten(1)


@pytest.mark.parametrize("preset", presets(COMPARED))
def test_bf16_keeps_the_float32_tokens_up_to_ties(train_config, preset):
    """The same weights and batch, one step in float32 and one in bf16 autocast: the same kept tokens,
    except, for a ranking policy, cells whose float32 scores tie within `TIE_TOLERANCE`."""
    cfg = train_config(f"method={preset}")
    pl.seed_everything(0, verbose=False)
    module = instantiate(cfg.model)
    attach_barebones_trainer(module)
    batch = next(iter(instantiate(cfg.data).train_dataloader()))
    with torch.no_grad():
        full = module.training_step(batch, 0)
        with MixedPrecision("bf16-mixed", "cpu").forward_context():
            mixed = module.training_step(batch, 0)

    assert mixed["keep"].dtype == torch.long and mixed["keep"].shape == full["keep"].shape
    masking = module.masking
    if not isinstance(masking, AttentiveLow | AttentiveHigh):  # random draws from the same generator
        assert torch.equal(mixed["keep"], full["keep"])
        return
    assert mixed["score_map"].dtype == torch.float32
    grid = tuple(full["grid"])
    scores = cell_scores(map_scores_to_views(full["score_map"], batch["boxes"], grid), grid, masking.unit)
    kept_full = kept_cells(full["keep"], grid, masking.unit)
    kept_mixed = kept_cells(mixed["keep"], grid, masking.unit)
    for row, (ours, theirs) in enumerate(zip(kept_full, kept_mixed, strict=True)):
        kept = scores[row, sorted(ours)]
        dropped = scores[row, sorted(set(range(scores.shape[1])) - ours)]
        low = isinstance(masking, AttentiveLow)  # keeps the highest scores
        boundary = (kept.min() + dropped.max()) / 2 if low else (kept.max() + dropped.min()) / 2
        swapped = scores[row, sorted(ours ^ theirs)]
        assert ((swapped - boundary).abs() <= TIE_TOLERANCE * boundary).all(), f"view {row}"


def test_cls_attention_is_float32_under_autocast():
    """The CLS row's softmax runs in float32 under bf16 autocast: its values are off bf16's grid (a bf16
    softmax, upcast afterwards, would lie on it) and match the float32 tower's to bf16's resolution."""
    torch.manual_seed(0)
    tower = VisionTower(image_size=32, patch_size=8, width=32, depth=2, heads=2, output_dim=16)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        reference = tower.cls_attention(images, layers="last")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = tower.cls_attention(images, layers="last")
    assert scores.dtype == torch.float32
    assert (scores != scores.bfloat16().float()).float().mean() > 0.9
    torch.testing.assert_close(scores, reference, rtol=2e-2, atol=0)


def test_clip_logits_are_float32_under_autocast():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    logit_scale = torch.tensor(math.log(100.0))
    loss = ClipLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_image, per_text = loss.logits(images.bfloat16(), texts.bfloat16(), logit_scale)
    assert per_image.dtype == per_text.dtype == torch.float32
    # Exactly the float32 product of the (bf16-rounded) features: no bf16 rounding of the logits themselves.
    expected = 100.0 * images.bfloat16().float() @ texts.bfloat16().float().T
    torch.testing.assert_close(per_image, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(per_text, expected.T, rtol=1e-6, atol=1e-5)


def test_embeddings_are_normalised_in_float32_under_autocast():
    torch.manual_seed(0)
    model = ClipModel(
        VisionTower(image_size=32, patch_size=8, width=32, depth=1, heads=2, output_dim=16),
        TextTower(context_length=8, vocab_size=64, width=32, heads=2, layers=1, output_dim=16),
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = [
            model.encode_image(torch.rand(3, 3, 32, 32), normalize=True),
            model.encode_text(torch.randint(1, 63, (3, 8)), normalize=True),
        ]
    for embedding in embeddings:
        assert embedding.dtype == torch.float32
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
