"""Text tower and tokenizer (open_clip's CLIP text transformer and bundled BPE vocabulary)."""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn


def build_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """CLIP's byte-pair tokenizer, read from the vocabulary file shipped inside open_clip (no network).

    Calling it on a string or a list of strings gives a LongTensor [N, context_length]: start token,
    BPE tokens (truncated to fit), end-of-text token, zero padding.
    """
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
    return SimpleTokenizer(context_length=context_length)


class TextTower(nn.Module):
    """Causal text transformer pooled at the end-of-text token, projected to the joint space."""

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: int = 512,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must be divisible by heads {heads}")
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
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """Projected text features [B, output_dim] of token ids [B, context_length]."""
        if tokens.shape[-1] != self.context_length:
            raise ValueError(
                f"text tokens have length {tokens.shape[-1]} but the tower's context_length is "
                f"{self.context_length}; tokenize with build_tokenizer({self.context_length})"
            )
        return self.transformer(tokens)
