"""A new masking policy is one class plus one config node: two policies written outside the package (one
that resizes the views) train through `train.py` in a copy of the repository, nothing else touched."""

from __future__ import annotations

import csv
import subprocess
import sys

from tests.helpers import TINY_SYNTHETIC_OVERRIDES, fresh_copy

POLICIES = '''
import torch

from aclip.modules.masking import TokenMasking


class CentreCells(TokenMasking):
    """Keep the cells nearest the image centre, the same for every sample."""

    def select_cells(self, scores, cells, batch, device, generator):
        rows, cols = cells
        row = torch.arange(rows, device=device).repeat_interleave(cols)
        col = torch.arange(cols, device=device).repeat(rows)
        distance = (row - (rows - 1) / 2) ** 2 + (col - (cols - 1) / 2) ** 2
        nearest = distance.topk(self.num_kept_cells(cells), largest=False).indices.sort().values
        return nearest.expand(batch, -1)


class QuarterSize(TokenMasking):
    """Every token of views a quarter of the side (at least one patch)."""

    def __init__(self):
        super().__init__(keep_ratio=1.0)

    def view_size(self, size, patch_size):
        return max(patch_size, size // 4 // patch_size * patch_size)

    def select_cells(self, scores, cells, batch, device, generator):
        return torch.arange(cells[0] * cells[1], device=device).expand(batch, -1)
'''


def test_policies_written_outside_the_package_train_through_train_py(tmp_path):
    copy = fresh_copy(tmp_path / "repository")
    (copy / "my_policies.py").write_text(POLICIES)
    (copy / "conf" / "masking" / "centre.yaml").write_text(
        "_target_: my_policies.CentreCells\nkeep_ratio: 0.25\n"
    )
    (copy / "conf" / "masking" / "quarter.yaml").write_text("_target_: my_policies.QuarterSize\n")
    steps = ["trainer.max_steps=1", "trainer.log_every_n_steps=1", "evaluation.at_end=false"]
    sweep = subprocess.run(
        [sys.executable, "train.py", "-m", "masking=centre,quarter", *TINY_SYNTHETIC_OVERRIDES, *steps],
        cwd=copy,
        capture_output=True,
        text=True,
    )
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    # 32 px at patch 8: a 4 x 4 grid. The centre keeps 4 of its 16 cells; the quarter-size views (8 px)
    # are one patch.
    expected = {"masking=centre": 4.0, "masking=quarter": 1.0}
    for job in sorted((copy / "logs" / "train" / "multiruns").glob("*/[0-9]")):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        masking = next(line.lstrip("- ") for line in overrides.splitlines() if "masking=" in line)
        with open(job / "csv" / "metrics.csv") as file:
            row = next(r for r in csv.DictReader(file) if r.get("train/kept_tokens"))
        assert float(row["train/kept_tokens"]) == expected.pop(masking)
    assert not expected, f"jobs missing: {expected}"
