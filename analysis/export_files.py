"""A built-in variant written out as one's own small dataset would be: PNG files listed with their captions
in a CSV for `data=csv`, held-out images in one folder per class, and the zero-shot set file that reads
them (docs/evaluation.md). The file path and the tiny recipe can then be tried at a budget of one's own
on data whose answer is known (docs/attentive_stability.md, section 12).

    python -m analysis.export_files /tmp/digits --variant segments --pairs 8382 --per-class 40

It prints the `train.py` command that trains on the files and evaluates on the folders.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from torchvision.io import write_png

from aclip.datamodules.synthetic import SyntheticCaptions, SyntheticClassification
from aclip.datamodules.synthetic.scenes import VARIANTS

ZERO_SHOT_SET = """# @package evaluation.sets
{name}:
  _target_: aclip.evaluation.ZeroShotClassification
  dataset:
    _target_: aclip.datamodules.eval_sets.ImageFolderClassification
    root: {root}
  classnames: null
  templates: ["a photo of a {{}}."]
"""


def export(out: Path, variant: str, pairs: int, per_class: int, image_size: int, seed: int) -> str:
    """Write the files under `out`; return the name of the zero-shot set (`eval=[<name>]`)."""
    train = SyntheticCaptions(size=pairs, image_size=image_size, seed=seed, variant=variant)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "train.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "title"])
        for index in range(len(train)):
            pixels, caption = train[index][:2]
            name = f"images/{index:05d}.png"
            write_png(pixels, str(out / name))
            writer.writerow([name, caption])
    held_out = SyntheticClassification(
        size=per_class * len(VARIANTS[variant].classnames),
        image_size=image_size,
        seed=seed + 1,
        variant=variant,
    )
    for index in range(len(held_out)):
        pixels, label = held_out[index]
        folder = out / "eval" / held_out.classnames[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        write_png(pixels, str(folder / f"{index:05d}.png"))
    name = f"{variant}_files"
    (out / "conf" / "eval").mkdir(parents=True, exist_ok=True)
    (out / "conf" / "eval" / f"{name}.yaml").write_text(ZERO_SHOT_SET.format(name=name, root=out / "eval"))
    return name


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the folder to write (made if missing)")
    parser.add_argument("--variant", default="segments", choices=sorted(VARIANTS))
    parser.add_argument("--pairs", type=int, default=8382, help="training image-caption pairs")
    parser.add_argument("--per-class", type=int, default=40, help="held-out images per class")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--seed", type=int, default=2026, help="the pairs' seed; the held-out images use seed + 1"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    name = export(out, args.variant, args.pairs, args.per_class, args.image_size, args.seed)
    search_path = f"'hydra.searchpath=[file://{out / 'conf'}]'"
    print(
        f"python train.py data=csv data.train.path={out / 'train.csv'} {search_path} 'eval=[{name}]' "
        f"optimized_metric=zeroshot/{name}/top1"
    )


if __name__ == "__main__":
    main()
