"""The CUDA branches outside the training step, on a real GPU (`gpu`: benchmarks/gpu.sh's first part).

Each is a place where the code or a dependency does something else when CUDA is there (BENCHMARKS.md, "GPU:
what is proven on a CPU"): the whole Lightning run on one GPU (bf16 autocast, pinned host memory, the peak
memory log, the CUDA random states in the checkpoint, the final evaluation on the device), and the CUDA
random states of a resume; and, with two processes sharing one GPU over gloo, SyncBatchNorm's CUDA kernels
and the losses' all-gather with gradient on CUDA tensors (NCCL itself needs two GPUs).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from aclip.callbacks.resume import collect_random_states, restore_random_states
from aclip.modules.losses import ClipLoss
from aclip.tasks import train
from tests.helpers import gloo_world

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_run_on_one_gpu_logs_its_memory_and_checkpoints_the_cuda_random_state(train_config, tmp_path):
    cfg = train_config(
        "trainer=gpu",
        "method=aclip",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput.window_size=2",
    )
    metrics = train(cfg)  # bf16-mixed, pinned batches, the final evaluation on the GPU

    assert metrics and all(value == value for figures in metrics.values() for value in figures.values())
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        memory = [
            float(row["train/device/max_memory_gb"])
            for row in csv.DictReader(file)
            if row.get("train/device/max_memory_gb")
        ]
    assert memory and all(value > 0 for value in memory)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    states = next(state for key, state in checkpoint["callbacks"].items() if "ResumeState" in key)
    assert len(states["ranks"][0]["cuda"]) == torch.cuda.device_count()


def test_restored_random_states_replay_the_cuda_draws():
    torch.cuda.manual_seed_all(1)
    states = collect_random_states()
    expected = torch.rand(5, device="cuda")
    restore_random_states(states)
    torch.testing.assert_close(torch.rand(5, device="cuda"), expected, rtol=0, atol=0)


def _sync_batch_norm_and_gathered_loss(rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s half of a batch through SyncBatchNorm and ClipLoss on cuda:0, and the gradients."""
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    features = torch.randn(8, 16, device=device)[rank * 4 : (rank + 1) * 4].requires_grad_()
    texts = torch.randn(8, 16, device=device)[rank * 4 : (rank + 1) * 4].requires_grad_()
    norm = nn.SyncBatchNorm(16).to(device)
    normalised = nn.functional.normalize(norm(features), dim=-1)
    loss = ClipLoss()(normalised, nn.functional.normalize(texts, dim=-1), torch.tensor(2.0, device=device))
    loss.backward()
    assert dist.get_backend() == "gloo"
    return {"loss": loss.detach().cpu(), "features": features.grad.cpu(), "texts": texts.grad.cpu()}


def test_sync_batch_norm_and_the_gathered_loss_on_cuda_tensors_across_two_processes(tmp_path: Path):
    """Two processes on one GPU (gloo): the global-batch loss and, scaled by the world size as DDP's average
    undoes, the single process's gradients."""
    ranks = gloo_world(_sync_batch_norm_and_gathered_loss, tmp_path)
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    features = torch.randn(8, 16, device=device).requires_grad_()
    texts = torch.randn(8, 16, device=device).requires_grad_()
    normalised = nn.functional.normalize(nn.BatchNorm1d(16).to(device)(features), dim=-1)
    loss = ClipLoss()(normalised, nn.functional.normalize(texts, dim=-1), torch.tensor(2.0, device=device))
    loss.backward()
    for rank, record in enumerate(ranks):
        torch.testing.assert_close(record["loss"], loss.detach().cpu())
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(record["features"] / 2, features.grad[rows].cpu(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(record["texts"] / 2, texts.grad[rows].cpu(), rtol=1e-4, atol=1e-6)
