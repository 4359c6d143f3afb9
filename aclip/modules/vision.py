"""Vision tower: a timm VisionTransformer that runs on a chosen subset of patch tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.layers import Attention
from timm.models import VisionTransformer
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aclip.initialize import load_vision_weights
from aclip.specs import is_integer

Layers = str | Sequence[int]


# How the tower pools its tokens: the CLS token, or the average of the (kept) patch tokens (CLIPA's GAP).
POOLS = ("token", "avg")
# Position embeddings: learned, or the fixed 2-D sin-cos table of MAE (CLIPA's pre-training), not trained.
POSITION_EMBEDDINGS = ("learned", "sincos")
# timm's initialisations of the trunk: "" (timm's: truncated normal of std 0.02 for every linear layer,
# as A-CLIP's code), "jax" (Xavier uniform, the original ViT's) or "moco" (Xavier uniform per q, k, v).
WEIGHT_INITS = ("", "jax", "moco")
# How pixels become patch tokens: "patch" (ViT's linear projection of each patch) or "conv" (`ConvStem`).
STEMS = ("patch", "conv")

# Per-channel pixel statistics the tower normalises its input with, by name.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "openai": (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


class ConvStem(nn.Sequential):
    """A convolutional stem in place of ViT's patch projection (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): log2(`patch_size`) 3 x 3 convolutions of stride 2, each followed by batch
    norm and a ReLU, their channels doubling up to `width`, then a 1 x 1 convolution to `width`. The batch
    norms are what makes it learn fine strokes at once (docs/attentive_stability.md, section 7: per-image
    norms, or none, do not): in training they normalise over the batch's whole views, before any token
    is removed, with each process's own statistics unless `trainer.sync_batchnorm` makes them
    SyncBatchNorm (GPU only); evaluation and the EMA teacher use the running statistics.

    It maps an image to the same grid of tokens as the patch projection, one per `patch_size` patch, so
    token removal keeps and drops the same patches; a token's receptive field reaches a few pixels into
    its neighbours (15 px for 8 px patches, 31 px for 16 px ones), so a dropped patch's border pixels
    still reach the tokens kept beside it. Its features are non-linear from the first step, where a patch
    projection's are linear in the pixels.
    """

    def __init__(self, patch_size: int, width: int, in_channels: int = 3) -> None:
        stages = patch_size.bit_length() - 1
        if patch_size < 2 or patch_size != 1 << stages:
            raise ValueError(f"stem=conv needs a patch_size that is a power of 2, got {patch_size}")
        layers: list[nn.Module] = []
        for stage in range(stages):
            channels = max(width >> (stages - 1 - stage), 1)
            layers += [
                nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = channels
        super().__init__(*layers, nn.Conv2d(in_channels, width, 1))


class VisionTower(nn.Module):
    """ViT image encoder with token removal and a projection to the joint embedding space.

    The wrapped timm model is `.trunk`. It accepts any image size whose sides are multiples of the
    patch size; position embeddings are interpolated to the input grid. `forward(images, keep)` embeds
    all patches, adds position embeddings, then keeps only the CLS token and the patches listed in
    `keep`, so dropped tokens never enter a transformer block.

    Images come in as pixels, uint8 in [0, 255] or float in [0, 1], and are normalised here with the
    `normalize` statistics ("openai": CLIP's; "imagenet": ImageNet's, as A-CLIP's code), so that the data
    pipeline moves compact pixels and the normalisation runs on the model's device. `freeze_patch_embed`
    keeps the patch embedding's projection at its initialisation and out of the optimizer (MoCo v3's
    stabiliser, which A-CLIP's code applies). `pre_norm` adds a LayerNorm before the first block (CLIP's
    and open_clip's `ln_pre`), `pool` chooses the pooled feature ("token": the CLS token; "avg": the mean
    of the patch tokens the tower saw, after the final norm, as open_clip's "avg"), and `pos_embed` the
    position embeddings ("learned", or "sincos": MAE's fixed 2-D sin-cos table, as CLIPA pre-trains),
    `weight_init` timm's initialisation of the trunk (`WEIGHT_INITS`), and `stem` how pixels become
    patch tokens ("patch": ViT's linear projection; "conv": a `ConvStem` in its place, on the same grid).
    `init_from` loads the trunk from a timm ViT state dict, its position embeddings resized to this grid
    (`aclip.initialize.load_vision_weights`).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
        drop_path_rate: float = 0.0,
        normalize: str = "openai",
        freeze_patch_embed: bool = False,
        pre_norm: bool = False,
        pool: str = "token",
        pos_embed: str = "learned",
        weight_init: str = "",
        stem: str = "patch",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        check_patch_grid(image_size, patch_size)
        if width % heads:
            raise ValueError(f"vision width {width} must be divisible by heads {heads}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {normalize!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
        if pos_embed not in POSITION_EMBEDDINGS:
            raise ValueError(f"pos_embed must be one of {list(POSITION_EMBEDDINGS)}, got {pos_embed!r}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {list(WEIGHT_INITS)}, got {weight_init!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {stem!r}")
        if stem == "conv" and freeze_patch_embed:
            raise ValueError(
                "freeze_patch_embed=true keeps ViT's linear patch projection at its initialisation (MoCo "
                "v3's stabiliser); stem=conv replaces that projection: set one of them"
            )
        if pos_embed == "sincos" and width % 4:
            raise ValueError(f"pos_embed=sincos needs a vision width divisible by 4, got {width}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.normalize = normalize
        self.pre_norm = pre_norm
        self.pool = pool
        self.stem = stem
        mean, std = NORMALIZATIONS[normalize]
        # Not saved: they follow from `normalize`, which the checkpoint's description holds.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.trunk = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            num_classes=0,
            global_pool="token",
            class_token=True,
            pre_norm=pre_norm,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            weight_init=weight_init,
        )
        if stem == "conv":
            self.trunk.patch_embed.proj = ConvStem(patch_size, width)
        for module in self.trunk.modules():
            if isinstance(module, Attention):
                module.fused_attn = True  # F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
        if pos_embed == "sincos":
            with torch.no_grad():
                self.trunk.pos_embed.zero_()  # the CLS token's position stays zero, as MAE's table
                self.trunk.pos_embed[0, self.trunk.num_prefix_tokens :] = sincos_position_table(
                    self.grid(image_size), width
                )
            self.trunk.pos_embed.requires_grad_(False)
        if init_from is not None:
            load_vision_weights(self.trunk, init_from)
        self.trunk.patch_embed.proj.requires_grad_(not freeze_patch_embed)
        self.proj = nn.Linear(width, output_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def grid(self, height: int, width: int | None = None) -> tuple[int, int]:
        """Patch grid (rows, columns) of an image of the given size."""
        width = height if width is None else width
        return height // self.patch_size, width // self.patch_size

    def normalize_pixels(self, images: Tensor) -> Tensor:
        """Pixels (uint8 in [0, 255], or float in [0, 1]) to the normalised input of the patch embedding."""
        if images.dtype == torch.uint8:
            images = images.to(self.trunk.cls_token.dtype).div_(255)
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def embed(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Tokens entering the first block: CLS first, then the kept patches in `keep` order."""
        trunk = self.trunk
        tokens = trunk._pos_embed(trunk.patch_embed(self.normalize_pixels(images)))  # [B, 1 + gh * gw, C]
        if keep is not None:
            tokens = keep_tokens(tokens, keep, trunk.num_prefix_tokens)
        return trunk.norm_pre(tokens)

    def forward(
        self, images: Tensor, keep: Tensor | None = None, *, return_cls_token: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Projected CLS features [B, output_dim] of `images` [B, 3, H, W] seeing only `keep` patches;
        with `return_cls_token`, also the `cls_features` they project, as `(cls_features, projected)`.

        `keep` is a LongTensor [B, n_keep] of row-major patch indices (CLS excluded) or None for all.
        """
        features = self.cls_features(images, keep)
        return (features, self.proj(features)) if return_cls_token else self.proj(features)

    def cls_features(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """The pooled features (the CLS token, or the patch average with `pool="avg"`) after the final
        norm, before the projection [B, width] (what A-CLIP's self-supervised heads read); `forward` is
        their projection."""
        tokens = self.embed(images, keep)
        checkpointing = self.trunk.grad_checkpointing and torch.is_grad_enabled()
        for block in self.trunk.blocks:
            tokens = checkpoint(block, tokens, use_reentrant=False) if checkpointing else block(tokens)
        return self._pool(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.trunk.set_grad_checkpointing(enable)

    def forward_with_cls_attention(
        self, images: Tensor, layers: Layers = "all", project: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Projected CLS features [B, output_dim] (`project=False`: the `cls_features` before the projection)
        and CLS-attention scores [B, gh * gw], in one pass.

        The score of patch P is softmax_j(q(CLS) . k(j) / sqrt(d)) at j = P, averaged over heads and
        over the blocks in `layers` ("all", "last", or a list of block indices). Only the CLS query
        row is formed; the blocks' outputs still come from fused attention. The row and the scores are
        float32 (float64 in a float64 model) under any autocast: the kept-token choice ranks them.
        """
        chosen = self.resolve_layers(layers)
        tokens = self.embed(images)
        score_shape = (tokens.shape[0], tokens.shape[1] - self.trunk.num_prefix_tokens)
        score_sum = tokens.new_zeros(score_shape, dtype=_at_least_float32(tokens.dtype))
        for index, block in enumerate(self.trunk.blocks):
            if index in chosen:
                tokens, scores = _block_with_cls_attention(block, tokens, self.trunk.num_prefix_tokens)
                score_sum += scores
            else:
                tokens = block(tokens)
        features = self._pool(tokens)
        return (self.proj(features) if project else features), score_sum / len(chosen)

    def cls_attention(self, images: Tensor, layers: Layers = "all") -> Tensor:
        """CLS-attention scores [B, gh * gw] of every patch (see `forward_with_cls_attention`)."""
        return self.forward_with_cls_attention(images, layers)[1]

    def resolve_layers(self, layers: Layers) -> list[int]:
        """Block indices for "all", "last" or a list of (possibly negative) indices; validated."""
        return resolve_layers(layers, len(self.trunk.blocks))

    def _pool(self, tokens: Tensor) -> Tensor:
        tokens = self.trunk.norm(tokens)
        return tokens[:, 0] if self.pool == "token" else tokens[:, self.trunk.num_prefix_tokens :].mean(dim=1)


def sincos_position_table(grid: tuple[int, int], width: int) -> Tensor:
    """MAE's fixed 2-D sin-cos position embeddings [rows * columns, width] (row-major patches): the first
    half of the channels encodes the column, the second the row, each as sines then cosines."""
    from timm.layers import build_sincos2d_pos_embed

    # timm's table is row then column; MAE's, column then row.
    return build_sincos2d_pos_embed(list(grid), width, interleave_sin_cos=True).roll(width // 2, dims=1)


def check_patch_grid(image_size: int, patch_size: int, prefix: str = "") -> None:
    """A ValueError unless `image_size` is a multiple of `patch_size` (keys named with `prefix`)."""
    if image_size % patch_size:
        raise ValueError(
            f"{prefix}image_size={image_size} must be a multiple of {prefix}patch_size={patch_size}"
        )


def check_layers(layers: Layers) -> str | list[int]:
    """`layers` if it is "all", "last" or a non-empty list of (possibly negative) block indices, a list;
    a ValueError for anything else."""
    if layers in ("all", "last"):
        return layers
    if (
        isinstance(layers, str)
        or not isinstance(layers, Sequence)
        or not layers
        or not all(is_integer(i) for i in layers)
    ):
        raise ValueError(f'layers must be "all", "last" or a non-empty list of block indices, got {layers!r}')
    return list(layers)


def resolve_layers(layers: Layers, depth: int) -> list[int]:
    """Block indices of a tower of `depth` blocks for "all", "last" or a list of (possibly negative)
    indices, sorted and unique; a ValueError for anything else or an index out of range."""
    layers = check_layers(layers)
    if layers == "all":
        return list(range(depth))
    if layers == "last":
        return [depth - 1]
    if any(not -depth <= index < depth for index in layers):
        raise ValueError(f"layers {list(layers)} out of range for a tower of {depth} blocks")
    return sorted({index % depth for index in layers})


def keep_tokens(tokens: Tensor, keep: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Keep the prefix tokens and the patch tokens indexed by `keep` [B, n_keep] (patch indices)."""
    if keep.dtype != torch.long or keep.dim() != 2 or keep.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"keep must be a LongTensor [batch={tokens.shape[0]}, n_keep], "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    index = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes; float32 and float64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def _block_with_cls_attention(block: Block, tokens: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """A timm `Block` forward that also returns the CLS query's attention to each patch [B, N_patches].

    It follows `Block.forward` and `Attention.forward` step for step, sharing q and k between the fused
    attention of all rows and the explicit softmax of the CLS row (O(N) extra work, not O(N^2)).
    """
    attn = block.attn
    x = block.norm1(tokens)
    batch, length, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    # The CLS row in float32 under any autocast, whose op lists differ by device (CUDA's runs softmax in
    # float32, the CPU's in bf16): the kept-token choice ranks these scores. O(N) work per head.
    dtype = _at_least_float32(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        cls_row = ((q[:, :, :1].to(dtype) * attn.scale) @ k.to(dtype).transpose(-2, -1)).softmax(dim=-1)
    out = out.transpose(1, 2).reshape(batch, length, attn.attn_dim)
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    tokens = tokens + block.drop_path1(block.ls1(out))
    tokens = tokens + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
    return tokens, cls_row.mean(dim=1)[:, 0, num_prefix_tokens:]
