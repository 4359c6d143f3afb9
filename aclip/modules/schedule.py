"""Learning-rate schedule: linear warm-up, then cosine decay, by optimizer step."""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, start_lr: float, final_lr: float
) -> float:
    """Learning rate at optimizer step `step` (0-based).

    Rises linearly from `start_lr` to `base_lr` over `warmup_steps`, then follows a half cosine from
    `base_lr` down to `final_lr`, reached at `total_steps`; constant at `final_lr` after that.
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))
