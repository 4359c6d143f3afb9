"""Evaluate trained models on masked views: does a student do better on views like the ones it trained on?

Attentive students trail random ones on the built-in data although their views keep more of the object
(docs/attentive_stability.md, section 4). One reading is a shift between training and test: their views
show the object and its surroundings, the test scenes every patch. This evaluates each run's models on
the held-out set three ways, at the same budget and cell size for every run:

- `full`: every patch, as the evaluation after training does;
- `random`: a random `keep_ratio` of the cells (a fixed seed, so every model sees the same masks);
- `attentive`: the cells the run's own EMA teacher attends to most (`attentive_low`), scored on the
  same image, as training scores its views.

    python -m analysis.masked_evaluation logs/train/multiruns/<timestamp>/*/      # one row per run
    python -m analysis.masked_evaluation <run> --keep-ratio 0.25 --unit 1

The evaluation of a run on its own policy's views, one or an ensemble, is a setting of the evaluation
itself: `evaluation.masked.views=[1,4]` (aclip/evaluation/masked.py, whose `MaskedViews` this uses).
Another built-in variant's held-out set: `--eval segments` (or `glyphs`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from aclip.cli import compose
from aclip.evaluation.masked import MaskedViews
from aclip.modules.masking import AttentiveLow, RandomMasking
from aclip.tasks import load_for_evaluation
from analysis.report import command_and_table


def reported_metric(eval_set: str) -> str:
    """The zero-shot top-1 of a built-in variant's held-out set (`eval=[<eval_set>]`)."""
    return f"zeroshot/{eval_set}/top1"


def measure(run: Path, keep_ratio: float, unit: int, eval_set: str = "synthetic") -> dict[str, float]:
    """Zero-shot top-1 on the built-in held-out set `eval_set` (a conf/eval option) of `run`'s EMA and
    online models, full and masked."""
    module, evaluation = load_for_evaluation(compose("eval", [f"ckpt_path={run}", f"eval=[{eval_set}]"]))
    teacher = module.ema_model.vision
    policies = {"random": RandomMasking(keep_ratio, unit), "attentive": AttentiveLow(keep_ratio, unit)}
    models: dict[str, nn.Module] = {}
    for name, model in {"ema": module.ema_model, "online": module.model}.items():
        models[f"{name} full"] = model
        models |= {f"{name} {view}": MaskedViews(model, policy, teacher) for view, policy in policies.items()}
    metrics = evaluation.run(models, module.tokenizer)
    return {name: values[reported_metric(eval_set)] for name, values in metrics.items()}


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--eval", dest="eval_set", default="synthetic", help="the built-in variant's held-out set (conf/eval)"
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or checkpoints")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument(
        "--unit", type=int, default=2, help="cell side in patches (the tiny attentive presets': 2)"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    rows = {run: measure(run, args.keep_ratio, args.unit, args.eval_set) for run in args.runs}
    text = f"{reported_metric(args.eval_set)} (%) on full and masked views\n\n" + command_and_table(
        "analysis.masked_evaluation", argv, "run", rows, digits=1
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
