"""Text tower: open_clip's CLIP text transformer (its tokenizer: `aclip.tokenizer`)."""

from __future__ import annotations

from open_clip.transformer import QuickGELU, TextTransformer, text_global_pool
from torch import Tensor, nn

from aclip.initialize import load_text_weights

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class TextTower(nn.Module):
    """Causal text transformer pooled at the end-of-text token, projected to the joint space.

    `activation` is the MLP's: "gelu", or "quick_gelu" (x * sigmoid(1.702 x), as CLIP and A-CLIP's code).
    `init_from` loads the transformer from an open_clip state dict, its position embeddings resized to
    this context length (`aclip.initialize.load_text_weights`).
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
        activation: str = "gelu",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must be divisible by heads {heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"text activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.context_length = context_length
        self.vocab_size = vocab_size
        # pool_type="argmax" pools at the end-of-text token: it has the largest id in CLIP's vocabulary.
        self.transformer = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            mlp_ratio=mlp_ratio,
            output_dim=output_dim,
            pool_type="argmax",
            act_layer=ACTIVATIONS[activation],
        )
        if init_from is not None:
            load_text_weights(self.transformer, init_from)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.transformer.set_grad_checkpointing(enable)

    def forward(self, tokens: Tensor) -> Tensor:
        """Projected text features [B, output_dim] of token ids [B, L], L <= context_length."""
        if tokens.shape[-1] > self.context_length:
            raise ValueError(
                f"text tokens have length {tokens.shape[-1]} but the tower's context_length is "
                f"{self.context_length}; tokenize with build_tokenizer({self.context_length}) "
                "(aclip.tokenizer) or shorter"
            )
        text = self.transformer
        # As TextTransformer.forward, but with the causal mask cut to the input length, so that
        # captions shorter than the context (CLIPA text reduction) cost proportionally less.
        x, causal_mask = text._embeds(tokens)
        length = tokens.shape[-1]
        x = text.transformer(x, attn_mask=causal_mask[:length, :length])
        pooled = text_global_pool(text.ln_final(x), tokens, pool_type="argmax")
        return pooled @ text.text_projection  # a [width, output_dim] Parameter (no bias)
