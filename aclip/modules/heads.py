"""MLP heads of the auxiliary self-supervised objectives (SimCLR head, BYOL and SimSiam heads)."""

from __future__ import annotations

from torch import Tensor, nn

from aclip.specs import is_integer

NORMS = ("layer", "batch", "sync_batch", "none")
ACTIVATIONS = ("gelu", "relu")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "sync_batch":
        return nn.SyncBatchNorm(dim)
    return nn.Identity()


class MLPHead(nn.Module):
    """`num_layers` linear layers: (Linear -> norm -> activation) x (num_layers - 1), then a final Linear.

    The last layer has no norm and no activation, as in the SimCLR head, the BYOL projector/predictor and
    the SimSiam predictor (the losses normalise the output themselves). With `num_layers=1` the head is a
    single Linear(in_dim, out_dim). The paper's SimCLR head is 3 layers, hidden 4096, output 256; BYOL's
    projector and predictor are 2 layers.

    `norm`:
    - "layer" (default): nn.LayerNorm, per sample, so it behaves the same at any per-GPU batch size
      (including 1) and needs no cross-rank synchronisation.
    - "batch": nn.BatchNorm1d, statistics of the local batch. In train mode it raises (ValueError from
      torch) on a single sample, and its statistics are per rank unless the trainer converts it
      (Lightning's `sync_batchnorm=True` turns BatchNorm layers into SyncBatchNorm).
    - "sync_batch": nn.SyncBatchNorm, statistics of the global batch under torch.distributed (needs GPU
      tensors when a process group is initialised; plain batch norm otherwise).
    - "none": no normalisation.

    `bias`: None (default) gives every Linear a bias except those followed by a batch norm (whose
    centring would cancel it); True gives every Linear one (A-CLIP's SimCLR head), False none (A-CLIP's
    BYOL projector and predictor).

    The input may have any leading dimensions, `[..., in_dim] -> [..., out_dim]`: they are flattened into
    one batch dimension, so batch norms see every row (e.g. all B * k views) as one batch.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        num_layers: int = 3,
        norm: str = "layer",
        activation: str = "gelu",
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not is_integer(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_dim, self.out_dim = in_dim, out_dim

        hidden_bias = norm not in ("batch", "sync_batch") if bias is None else bias
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=hidden_bias))
            layers.append(_norm(norm, hidden_dim))
            layers.append(nn.GELU() if activation == "gelu" else nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=True if bias is None else bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected input [..., {self.in_dim}], got {tuple(x.shape)}")
        leading = x.shape[:-1]
        return self.net(x.reshape(-1, self.in_dim)).reshape(*leading, self.out_dim)
