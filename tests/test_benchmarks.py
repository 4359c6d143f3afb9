"""The benchmarks run end to end on the tiny model, count FLOPs sensibly, and the step has no host syncs."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aclip.modules.losses import SimCLRLoss, SimSiamLoss
from aclip.modules.masking import AttentiveLow, RandomMasking
from aclip.modules.score_geometry import map_scores_to_views
from aclip.modules.vision import VisionTower
from benchmarks import loader, step_cost
from benchmarks.throughput import forward_backward_flops, vision_flops
from benchmarks.variants import VARIANTS, compose_variant


def test_step_cost_quick_reports_every_variant(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    text = step_cost.main(["--quick", "--threads", "1", "--breakdown", "aclip", "--output", str(output)])

    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(VARIANTS)
    assert rows["clip"].split("|")[5].strip() == "1.00"  # ratio to clip
    assert "Phase breakdown of `aclip`" in text and "| EMA scoring |" in text
    assert output.read_text().strip() == text.strip()


def test_step_cost_against_open_clip_pairs_steps_on_equal_towers() -> None:
    text = step_cost.main(
        [
            "--quick",
            "--threads",
            "1",
            "--variants",
            "clip",
            "random_1x50",
            "--breakdown",
            "--against",
            "open_clip",
        ]
    )

    rows = {
        line.split("|")[1].strip(" `"): line.split("|")
        for line in text.splitlines()
        if line.startswith("| `")
    }
    # open_clip's steps were timed in the same rotation; its patch dropout keeps half the patches.
    assert rows["open_clip"][3].strip() == "1 x 64/64" and rows["open_clip_pd50"][3].strip() == "1 x 32/64"
    # A bare --breakdown profiles every timed variant of this project (the references are not AClip steps).
    assert re.findall(r"Phase breakdown of `(\w+)`", text) == ["clip", "random_1x50"]
    pairs = text.split("Against open_clip")[1].split("Phase breakdown")[0]
    assert "`clip` | `open_clip` (patch_dropout 0.0)" in pairs
    assert "`random_1x50` | `open_clip_pd50` (patch_dropout 0.5)" in pairs
    # The towers are the same sizes: the trainable parameter counts agree to within 0.01 %.
    shares = [float(share) for share in re.findall(r"\(([-+]\d+\.\d+)%\)", pairs)]
    assert len(shares) == 2 and all(abs(share) < 0.01 for share in shares)


@pytest.mark.parametrize(
    ("argv", "profiled"),
    [([], ["aclip", "aclip_eff"]), (["--breakdown", "none"], []), (["--breakdown", "resize"], ["resize"])],
)
def test_step_cost_breakdown_names_variants_or_none(argv: list[str], profiled: list[str]) -> None:
    assert step_cost.parse_args(["--quick", *argv]).breakdown == profiled


def test_step_cost_breakdown_none_stands_alone() -> None:
    with pytest.raises(SystemExit):
        step_cost.parse_args(["--quick", "--breakdown", "none", "clip"])


def test_loader_quick_times_every_source_and_method(tmp_path: Path) -> None:
    text = loader.main(["--quick", "--no-record", "--profile", "csv:aclip", "--fixture", str(tmp_path)])

    rates, stages = text.split("share of the time")[0].split("The image stages alone")  # not the profile
    rows = [line.split("|") for line in rates.splitlines() if line.startswith("| `")]
    names = {(row[1].strip(" `"), row[2].strip(" `")) for row in rows}
    assert names == {(source, method) for source in loader.SOURCES for method in loader.METHODS} | {
        ("open_clip", "image_transform(is_train=True)")
    }
    assert all(float(row[4].split()[0]) > 0 for row in rows)
    # The csv pipelines' image stages, timed in the same rounds: ms per sample of each stage.
    stage_rows = {
        row[1].strip(" `"): row for row in (line.split("|") for line in stages.splitlines()) if len(row) > 6
    }
    assert set(stage_rows) >= {f"csv:{method}" for method in loader.METHODS}
    assert all(
        float(stage_rows[f"csv:{method}"][column]) > 0 for method in loader.METHODS for column in (2, 3, 4)
    )
    assert "share of the time" in text  # the profile of csv:aclip


def test_gpu_script_runs_only_options_the_benchmarks_accept() -> None:
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh").read_text()
    commands = re.findall(r'"\$python" -m (benchmarks\.\w+)((?:\\\n|[^\n])*)', script)
    assert {name for name, _ in commands} == {
        "benchmarks.step_cost",
        "benchmarks.throughput",
        "benchmarks.loader",
    }
    for name, arguments in commands:
        argv = shlex.split(arguments.replace("\\\n", " ").replace('"$workers"', "2"))
        argv = ["cpu" if arg == "cuda" else arg for arg in argv]  # parse here, run there
        importlib.import_module(name).parse_args(argv)  # exits on an unknown or stale option


def test_gpu_script_runs_every_gpu_marked_test() -> None:
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh").read_text()
    # The whole tests/ folder selected by the marker alone: a new `gpu` test runs without an edit here.
    assert re.search(
        r'^part "GPU tests" \d+ "\$python" -m pytest -m gpu [^\n]* tests/$', script, re.MULTILINE
    )


def test_flop_count_scales_with_kept_tokens() -> None:
    # ViT's patch projection: a convolutional stem (the tiny default's) runs on every pixel of each view
    # before tokens are removed, so its cost does not shrink with them.
    tower = VisionTower(**compose_variant("clip", "tiny", 8, ["model.vision.stem=patch"]).model.vision)
    images = torch.randn(4, 3, tower.image_size, tower.image_size)
    full = vision_flops(tower, images)
    two_views = images.repeat_interleave(2, dim=0)
    keep = RandomMasking(keep_ratio=0.5).select(None, tower.grid(tower.image_size), batch=8)
    masked = vision_flops(tower, two_views, keep)

    assert full > 0
    # Two views of half the patches each cost about one full view (attention is a little cheaper).
    assert masked == pytest.approx(full, rel=0.15)
    # Attention is counted on the CPU too (torch's counter knows only the CUDA kernels by itself).
    q = torch.randn(2, 2, 16, 8, requires_grad=True)
    assert forward_backward_flops(lambda: F.scaled_dot_product_attention(q, q, q)) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masking_and_auxiliary_losses_do_not_synchronise() -> None:
    device = torch.device("cuda")
    score_map = torch.rand(4, 7, 7, device=device)
    boxes = torch.tensor([[0.0, 0.0, 0.6, 0.7], [0.3, 0.2, 1.0, 1.0]], device=device).expand(4, 2, 4)
    views = torch.randn(4, 2, 16, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores = map_scores_to_views(score_map, boxes, (14, 14))
        AttentiveLow(keep_ratio=0.5).select(scores, (14, 14), batch=8)
        SimCLRLoss()(views)
        SimSiamLoss()(views, views)
    finally:
        torch.cuda.set_sync_debug_mode("default")
