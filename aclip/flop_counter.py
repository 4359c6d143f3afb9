"""torch's FLOP counter, counting attention on a CPU too: what the training budget (`aclip.compute`), the
throughput monitor's MFU and the benchmarks count with."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop


def _raw(formula: Any) -> Any:
    """torch's (shape-wrapped) FLOP formula in the form `FlopCounterMode(custom_mapping=...)` takes."""

    def count(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


# torch's FLOP counter knows the CUDA attention kernels, not the one scaled_dot_product_attention picks on
# a CPU: without these, attention would count zero on a CPU.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _raw(sdpa_flop),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(sdpa_backward_flop),
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (matrix products, convolutions, attention on every device), silent."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
