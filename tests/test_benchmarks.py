"""The benchmarks run end to end on the tiny model, count FLOPs sensibly, and the step has no host syncs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aclip.modules.losses import SimCLRLoss, SimSiamLoss
from aclip.modules.masking import AttentiveMasking, RandomMasking, map_scores_to_views
from aclip.modules.vision import VisionTower
from benchmarks import step_cost
from benchmarks.harness import VARIANTS, compose_variant
from benchmarks.throughput import forward_backward_flops, vision_flops


def test_step_cost_quick_reports_every_variant(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    text = step_cost.main(["--quick", "--threads", "1", "--breakdown", "aclip", "--output", str(output)])

    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(VARIANTS)
    assert rows["clip"].split("|")[5].strip() == "1.00"  # ratio to clip
    assert "Phase breakdown of `aclip`" in text and "| EMA scoring |" in text
    assert output.read_text().strip() == text.strip()


def test_flop_count_scales_with_kept_tokens() -> None:
    tower = VisionTower(**compose_variant("clip", "tiny", 8).model.vision)
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
        AttentiveMasking(keep_ratio=0.5).select(scores, (14, 14), batch=8)
        SimCLRLoss()(views)
        SimSiamLoss()(views, views)
    finally:
        torch.cuda.set_sync_debug_mode("default")
