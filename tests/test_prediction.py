"""The memory model and the throughput prediction (benchmarks/memory.py, benchmarks/prediction.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from timm.models.vision_transformer import Block

from aclip.modules.text import TextTower
from aclip.modules.vision import VisionTower
from benchmarks import prediction
from benchmarks.flops import flop_counter
from benchmarks.memory import (
    SavedTensors,
    Tower,
    block_bytes_per_token,
    largest_batch,
    peak_bytes,
    sample_activation_bytes,
)
from benchmarks.variants import attach_barebones_trainer, build_variant

WIDTH, HEADS, TOKENS = 64, 2, 50


def saved_per_sample(run, batch_sizes=(4, 8)) -> float:
    """Bytes torch saves for the backward pass of `run(batch_size)` in bf16 autocast, per sample (the slope
    between two batch sizes: weights' bf16 copies and shared masks cancel)."""
    saved = []
    for batch_size in batch_sizes:
        counting = SavedTensors()
        with counting, torch.autocast("cpu", dtype=torch.bfloat16):
            run(batch_size)
        saved.append(counting.nbytes)
    return (saved[1] - saved[0]) / (batch_sizes[1] - batch_sizes[0])


def timm_block(batch_size: int) -> None:
    block = Block(WIDTH, HEADS, mlp_ratio=4.0)
    block.attn.fused_attn = True  # as VisionTower sets it
    block(torch.randn(batch_size, TOKENS, WIDTH, requires_grad=True))


def open_clip_block(batch_size: int) -> None:
    mask = torch.full((TOKENS, TOKENS), float("-inf")).triu(1)
    ResidualAttentionBlock(WIDTH, HEADS)(
        torch.randn(batch_size, TOKENS, WIDTH, requires_grad=True), attn_mask=mask
    )


@pytest.mark.parametrize("block", [timm_block, open_clip_block])
def test_a_block_keeps_what_the_model_says_byte_for_byte(block):
    torch.manual_seed(0)
    assert saved_per_sample(block) == TOKENS * block_bytes_per_token(Tower(WIDTH, 1, HEADS))


def test_the_towers_keep_what_the_model_says():
    """The whole towers (embedding, blocks, final norm; half the patches kept) within 0.5 %."""
    torch.manual_seed(0)
    vision = VisionTower(image_size=64, patch_size=8, width=WIDTH, depth=2, heads=HEADS, output_dim=32)
    text = TextTower(context_length=16, vocab_size=100, width=WIDTH, heads=HEADS, layers=2, output_dim=32)
    keep = torch.arange(0, 64, 2)

    def step(batch_size: int) -> None:
        images = torch.randint(0, 256, (batch_size, 3, 64, 64), dtype=torch.uint8)
        vision(images, keep.expand(batch_size, -1))
        text(torch.randint(1, 99, (batch_size, 16)))

    tower, none = Tower(WIDTH, 2, HEADS), Tower(WIDTH, 0, HEADS)
    model = sample_activation_bytes(1, 32, 64, 64, tower, 16, tower)
    assert model == sample_activation_bytes(1, 32, 64, 64, tower, 0, none) + sample_activation_bytes(
        0, 0, 0, 0, none, 16, tower
    )
    assert saved_per_sample(step) == pytest.approx(model, rel=5e-3)


def test_largest_batch_fills_the_memory_less_the_headroom():
    per_sample, static = 1e9, 10e9
    batch = largest_batch(80e9, per_sample, static, headroom=0.1)
    assert batch == 62  # (72 - 10) GB over 1 GB per sample
    assert peak_bytes(batch, per_sample, static) <= 0.9 * 80e9 < peak_bytes(batch + 1, per_sample, static)
    assert largest_batch(80e9, per_sample, 90e9) == 0


def test_the_fake_step_counts_the_real_steps_flops_and_the_models_memory():
    """`count_on_fake_tensors` (shapes only) against the same step on real tensors: equal FLOPs; and the
    activations it counts against the memory model, for A-CLIP (two views, the teacher, the heads), on
    ViT's patch projection, which the memory model describes (the paper models'; not the tiny default's
    convolutional stem)."""
    variant = build_variant("aclip", "tiny", 4, ["model.vision.stem=patch"])
    flops, activations = prediction.count_on_fake_tensors(variant, batch_sizes=(2, 4))

    attach_barebones_trainer(variant.module)
    with flop_counter() as counter:
        variant.module.training_step(variant.batch, 0)["loss"].backward()
    assert flops == counter.get_total_flops() / 4
    per_sample, _ = prediction.memory_model(variant)
    assert activations == pytest.approx(per_sample, rel=0.05)  # the tiny heads' share is larger than B/16's


def test_measured_figures_come_from_the_gpu_run_in_the_predicted_shape():
    variant = build_variant("clip", "tiny", 8)
    variant.times, variant.flops = [0.5, 0.4, 0.6], int(2e12)  # per step of 8 images
    variant.static_memory, variant.peak_memory = int(2e9), int(10e9)

    figures = prediction.measured(variant, batch_size=8, peak_tflops=1000.0)

    assert figures.images_per_second == pytest.approx(16.0)  # 8 images in the median 0.5 s
    assert figures.mfu == pytest.approx(2e12 / 0.5 / 1e15)
    assert figures.workers == math.ceil(16 / prediction.WORKER_RATES["one view"])
    assert figures.largest_batch == math.floor((72e9 - 2e9) / 1e9)  # 1 GB per sample above the static
    row = prediction.predict(variant, flops_per_image=2e12 / 8, batch_size=8)
    table = prediction.format_tables([row, replace(row, measured=figures)], batch_size=8)
    throughput, memory = (part.splitlines()[2:] for part in table.split("\n\n"))
    assert [line.count("|") for line in throughput + memory] == [10, 10, 8, 8]
    assert throughput[0].split("|")[5].strip() == "" and throughput[1].split("|")[5].strip() == "16"
    assert memory[1].split("|")[7].strip() == "70"
