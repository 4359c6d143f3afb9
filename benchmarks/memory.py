"""A memory model of one training step on a GPU under bf16-mixed: the bytes alive at its peak, when the
forward passes have saved everything the backward pass reads.

Per token, a pre-norm transformer block (timm's ViT block and open_clip's text block alike: fused attention,
a GELU MLP of ratio r, no dropout) of width w with h heads keeps for its backward pass:

    the float32 inputs of its two layer norms                        2 x 4w
    their means and reciprocal deviations (float32)                   2 x 2 x 4
    the bf16 inputs of the qkv and first MLP matmuls (the norms' outputs)   2 x 2w
    q, k and v                                                        3 x 2w
    the attention output (also the output projection's input)         2w
    the attention's log-sum-exp (float32, one per head)               4h
    the MLP's hidden activation before and after the GELU             2 x 2rw
                                                                      = (20 + 4r) w + 16 + 4h bytes

(36 w + 16 + 4h at r = 4; `tests/test_prediction.py` counts what torch saves for a real block of each
tower under bf16 autocast, byte for byte). The residual stream is float32 because the position embeddings
are: their sum with the bf16 patch embedding is promoted.

A training sample keeps this in every block of every pass with gradient, and per token each tower's final
layer norm keeps its float32 input and statistics (4w + 8). Each of its k online views (1 + kept tokens) also
keeps its pixels in bf16, the patch embedding's input (2 x 3 H W), the float32 tokens of all its P patches,
which the gather of the kept ones saves (4w (1 + P)), and the kept indices (8 per kept patch); its caption
(L tokens) keeps its token ids (8 L). The EMA teacher's pass runs without gradient and keeps nothing. Left
out, under 1 % at ViT-B/16: the heads' activations, the pooled features and the contrastive logits (two
float32 rows of the global batch per sample).

Independent of the batch: per trainable parameter 16 bytes (float32 weight, gradient and AdamW's two
moments), per parameter of the online model 2 more (autocast's bf16 copy, kept for the backward pass), per
frozen online parameter 4, per EMA parameter 4. What else the device holds (the CUDA context and library
workspaces, the allocator's fragmentation, the transient tensors of one block) is `HEADROOM` of its memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# The share of the device's memory left for what the model leaves out (see the module's docstring).
HEADROOM = 0.10


@dataclass(frozen=True)
class Tower:
    """The shape of a transformer tower: width, blocks, heads and the MLP's ratio."""

    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


def block_bytes_per_token(tower: Tower) -> float:
    """Bytes one block of `tower` keeps for its backward pass per token (the module's table)."""
    return (20 + 4 * tower.mlp_ratio) * tower.width + 16 + 4 * tower.heads


def tower_bytes(tokens: int, tower: Tower) -> float:
    """Bytes a sequence of `tokens` tokens keeps in `tower`'s blocks and final layer norm."""
    return tokens * (tower.depth * block_bytes_per_token(tower) + 4 * tower.width + 8)


def sample_activation_bytes(
    views: int, kept: int, patches: int, view_size: int, vision: Tower, text_tokens: int, text: Tower
) -> float:
    """Bytes one training sample keeps for the backward pass: `views` online views of `view_size` px, each
    keeping `kept` of its `patches` patches (and the CLS token) through `vision`, and its caption of
    `text_tokens` tokens through `text`."""
    pixels, all_patches = 2 * 3 * view_size**2, 4 * vision.width * (1 + patches)
    per_view = tower_bytes(1 + kept, vision) + pixels + all_patches + 8 * kept
    return views * per_view + tower_bytes(text_tokens, text) + 8 * text_tokens


def static_bytes(trainable: int, frozen: int, ema: int) -> float:
    """Bytes independent of the batch: weights, gradients, AdamW's moments, autocast's bf16 weight copies
    and the EMA teacher, for `trainable` and `frozen` online parameters and `ema` EMA parameters."""
    return 16 * trainable + 4 * frozen + 2 * (trainable + frozen) + 4 * ema


def peak_bytes(batch_size: int, per_sample: float, static: float) -> float:
    """The step's peak: the static bytes and `batch_size` samples' activations."""
    return static + batch_size * per_sample


def largest_batch(capacity: float, per_sample: float, static: float, headroom: float = HEADROOM) -> int:
    """The largest per-device batch whose peak fits in `capacity` bytes less `headroom` of them (0 if
    not even one sample fits)."""
    return max(0, math.floor(((1 - headroom) * capacity - static) / per_sample))


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """While active, the bytes of every storage torch saves for a backward pass, each storage once (a view
    saved beside its base costs nothing more), fake tensors' included: `nbytes`. The storages are held until
    this object goes, so that a freed graph's memory, reused by the next, is not taken for the same."""

    def __init__(self) -> None:
        self.storages: dict[Any, torch.UntypedStorage] = {}
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[StorageWeakRef(storage).cdata] = storage
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(storage.nbytes() for storage in self.storages.values())
