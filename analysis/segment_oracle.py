"""What an ideal observer can name from part of a seven-segment digit (the `segments` variant).

`data=segments` draws its digits as a display does: seven stroke positions, each lit or not, and most
digits differ from another in one or two of them. An observer that knows where the digit's frame is
and sees a position (at least half of its stroke inside the kept patches) knows whether it is lit; it
names the digit when one digit alone agrees with every position it saw. For each held-out digit this
keeps random `keep_ratio`s of the patches (cells of `unit` x `unit` patches, as the masking policies
choose them) and counts how often the digit can still be named: an upper bound on what any model can
tell from such a view, since this observer also knows where the frame is and ignores the clutter.

    python -m analysis.segment_oracle                          # 8 px patches, one at a time
    python -m analysis.segment_oracle --unit 2                 # 2 x 2-patch cells (the attentive presets')
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from aclip.datamodules import raster
from aclip.datamodules.synthetic import SEGMENTS_LIT, SyntheticClassification
from analysis.report import command_and_table

# [digit, position]: whether the digit lights segment position a..g.
LIT = np.array([[name in SEGMENTS_LIT[digit] for name in "abcdefg"] for digit in range(len(SEGMENTS_LIT))])


def position_coverage(
    segments: Sequence[tuple[tuple[float, float], ...]], width: float, size: int
) -> np.ndarray:
    """[positions, size, size]: the coverage each segment position's stroke would have, lit or not."""
    _, xs, ys = raster.region((0.0, 0.0, float(size), float(size)), size, margin=0.0)
    return np.stack(
        [
            raster.strokes(xs, ys, *np.asarray([segment], dtype=np.float32).transpose(1, 0, 2), width)
            for segment in segments
        ]
    )


def named(digit: int, coverage: np.ndarray, kept: np.ndarray) -> tuple[bool, int]:
    """Whether an observer of the positions `kept` [size, size] (bool) shows names `digit` alone, and how
    many digits agree with what it saw."""
    seen = (coverage * kept).sum(axis=(1, 2)) >= 0.5 * coverage.sum(axis=(1, 2))
    agree = (LIT[:, seen] == LIT[digit, seen]).all(axis=1)
    return bool(agree.sum() == 1), int(agree.sum())


def kept_pixels(rng: np.random.Generator, keep_ratio: float, cells: int, cell_pixels: int) -> np.ndarray:
    """A random `keep_ratio` of a `cells` x `cells` grid of cells, as a pixel mask."""
    chosen = np.zeros(cells * cells, dtype=bool)
    chosen[rng.permutation(cells * cells)[: round(keep_ratio * cells * cells)]] = True
    return np.kron(chosen.reshape(cells, cells), np.ones((cell_pixels, cell_pixels), dtype=bool))


def measure(
    keep_ratios: Sequence[float], unit: int, patch_size: int, samples: int, draws: int
) -> dict[float, dict[str, float]]:
    """Per keep ratio: the share of (digit, mask) draws the observer names, and its mean candidates."""
    dataset = SyntheticClassification(size=samples, variant="segments")
    cell_pixels = unit * patch_size
    cells = dataset.image_size // cell_pixels
    rng = np.random.default_rng(0)
    results: dict[float, list[tuple[bool, int]]] = {ratio: [] for ratio in keep_ratios}
    for index in range(samples):
        (digit,) = dataset.objects(index)
        coverage = position_coverage(digit.segments, digit.width, dataset.image_size)
        for ratio in keep_ratios:
            for _ in range(draws):
                results[ratio].append(
                    named(digit.digit, coverage, kept_pixels(rng, ratio, cells, cell_pixels))
                )
    return {
        ratio: {
            "named (%)": 100 * np.mean([ok for ok, _ in outcome]),
            "digits that agree (mean)": np.mean([count for _, count in outcome]),
        }
        for ratio, outcome in results.items()
    }


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep-ratios", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--unit", type=int, default=1, help="cell side in patches (random_2x50's: 1)")
    parser.add_argument("--patch-size", type=int, default=8, help="the tiny model's: 8")
    parser.add_argument("--samples", type=int, default=1000, help="held-out digits (the zero-shot set's)")
    parser.add_argument("--draws", type=int, default=10, help="random masks per digit and keep ratio")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    rows = measure(args.keep_ratios, args.unit, args.patch_size, args.samples, args.draws)
    text = command_and_table("analysis.segment_oracle", argv, "keep ratio", rows, digits=2)
    print(text)
    return text


if __name__ == "__main__":
    main()
