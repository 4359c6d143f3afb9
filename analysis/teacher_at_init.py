"""What the untrained teacher keeps: object recall, positional agreement and CLS self-attention at step 0.

An attentive run's first masks come from its EMA teacher before any training, a copy of the randomly
initialised student. For each seed this builds the module as `train.py` does (the same seeding, so the
same initial weights), draws one training batch of the built-in data with its object masks, and
measures what the teacher's masks would keep:

- object recall of the views' kept patches (random masking: about keep_ratio);
- positional agreement: the mean Jaccard index of the kept-patch sets of two different views, i.e.
  whether the teacher keeps the same positions whatever the image (random masking at 50 %: about 1/3);
- the CLS token's attention on itself (the share of the CLS row not on any patch), averaged over the
  layers the scores use;
- the spread of the untrained model's embeddings: the mean cosine similarity of two different images'
  (full views, every patch) and of two different captions' embeddings. Near 1, the model maps every
  input to about the same point and the CLIP loss starts on its ln(batch) plateau with little gradient
  that depends on the content (docs/attentive_stability.md, section 5).

    python -m analysis.teacher_at_init                         # attentive_2x50, seeds 0-9
    python -m analysis.teacher_at_init --method attentive_1x50 --seeds 0 1 2 --set data=glyphs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor

from aclip.modules.masking import RandomMasking
from aclip.modules.object_metrics import object_recall, patch_coverage
from aclip.modules.score_geometry import map_scores_to_views
from analysis.report import command_and_table
from benchmarks.variants import compose_training


def mean_over_pairs(pairwise: Tensor) -> float:
    """Mean of a square matrix of pairwise values over its pairs of different rows (off the diagonal)."""
    return pairwise[~torch.eye(len(pairwise), dtype=torch.bool)].mean().item()


def jaccard_agreement(keep: Tensor, patches: int) -> float:
    """Mean Jaccard index of the kept-patch sets over all pairs of different rows of `keep`."""
    sets = torch.zeros(keep.shape[0], patches).scatter_(1, keep, 1.0)
    inter = sets @ sets.T
    union = sets.sum(1, keepdim=True) + sets.sum(1) - inter
    return mean_over_pairs(inter / union)


def mean_similarity(unit_features: Tensor) -> float:
    """Mean cosine similarity over all pairs of different rows of `unit_features` (L2-normalised)."""
    return mean_over_pairs(unit_features @ unit_features.T)


def measure(method: str, seed: int, overrides: Sequence[str]) -> dict[str, float]:
    cfg = compose_training([f"method={method}", f"seed={seed}", *overrides])
    pl.seed_everything(seed, workers=True, verbose=False)
    module = instantiate(cfg.model)
    data = instantiate(cfg.data, num_workers=0)
    data.view_transform.teacher_crop = True
    batch = next(iter(data.train_dataloader()))
    views = batch["images"].flatten(0, 1)
    grid = module.model.vision.grid(*views.shape[-2:])
    with torch.no_grad():
        _, score_map = module.ema_pass(batch["ema_image"])
        image_features = module.model.encode_image(batch["images"][:, 0], normalize=True)
        text_features = module.model.encode_text(batch["text"], normalize=True)
    scores = map_scores_to_views(score_map, batch["boxes"], grid)
    coverage = patch_coverage(batch["object_masks"].flatten(0, 1), grid)
    keep = module.masking.select(scores, grid, len(views))
    chance = RandomMasking(module.masking.keep_ratio, module.masking.unit).select(None, grid, len(views))
    patches = grid[0] * grid[1]
    return {
        "object recall": object_recall(coverage, keep).nanmean().item(),
        "random's": object_recall(coverage, chance).nanmean().item(),
        "agreement": jaccard_agreement(keep, patches),
        "random's agreement": jaccard_agreement(chance, patches),
        "CLS on itself": 1 - score_map.flatten(1).sum(1).mean().item(),
        "image similarity": mean_similarity(image_features),
        "text similarity": mean_similarity(text_features),
    }


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="attentive_2x50", help="a conf/method preset that scores")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    rows = {seed: measure(args.method, seed, args.overrides) for seed in args.seeds}
    text = command_and_table("analysis.teacher_at_init", argv, "seed", rows, digits=3)
    print(text)
    return text


if __name__ == "__main__":
    main()
