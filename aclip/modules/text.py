"""Text tower and tokenizer (open_clip's CLIP text transformer and bundled BPE vocabulary)."""

from __future__ import annotations

import functools

import open_clip.tokenizer
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer, text_global_pool
from torch import Tensor, nn

# CLIPA's text token reductions, by our name, as open_clip's tokenizer calls them.
TEXT_REDUCTIONS = {"truncate": "", "random": "random", "block": "simple", "syntax": "syntax"}
# NLTK data that open_clip's syntax reduction reads (tokenizer, part-of-speech tagger).
_SYNTAX_DATA = ("tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng")


@functools.lru_cache(maxsize=8)
def build_tokenizer(context_length: int = 77, reduction: str = "truncate") -> SimpleTokenizer:
    """CLIP's byte-pair tokenizer, read from the vocabulary file shipped inside open_clip (no network).

    Calling it on a string or a list of strings gives a LongTensor [N, context_length]: start token,
    BPE tokens, end-of-text token, zero padding. A caption too long for the context is reduced by
    `reduction` (CLIPA): "truncate" keeps the first tokens, "random" a random subset in order,
    "block" a random contiguous window, "syntax" nouns, then adjectives, then verbs, then the rest.
    """
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
    if reduction not in TEXT_REDUCTIONS:
        raise ValueError(f"text reduction must be one of {sorted(TEXT_REDUCTIONS)}, got {reduction!r}")
    if reduction == "syntax":
        _require_syntax_data()
        return _SyntaxTokenizer(context_length=context_length, reduction_mask="syntax")
    return SimpleTokenizer(context_length=context_length, reduction_mask=TEXT_REDUCTIONS[reduction])


class _SyntaxTokenizer(SimpleTokenizer):
    """Checks NLTK's data in whichever process tokenizes (a spawned dataloader worker imports open_clip
    afresh), so open_clip's syntax reduction never falls back to downloading it."""

    def __call__(self, texts, context_length=None):
        if not open_clip.tokenizer._nltk_init:
            _require_syntax_data()
        return super().__call__(texts, context_length)


def _require_syntax_data() -> None:
    """Check NLTK and its data are installed, so that open_clip never tries to download them."""
    try:
        import nltk
    except ImportError as error:
        raise ImportError('text_masking=syntax needs NLTK: pip install -e ".[syntax]"') from error
    for resource in _SYNTAX_DATA:
        try:
            nltk.data.find(resource)
        except LookupError as error:
            names = " ".join(path.split("/")[1] for path in _SYNTAX_DATA)
            raise RuntimeError(
                f"text_masking=syntax needs the NLTK data '{resource}', which is not installed. On a machine "
                f"with network access run `python -m nltk.downloader -d <dir> {names}`, copy <dir> here and "
                "set NLTK_DATA=<dir> (or place it in one of nltk.data.path)."
            ) from error
    open_clip.tokenizer._nltk_init = True  # data present: skip open_clip's nltk.download() calls


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
            from aclip.initialize import load_text_weights  # it imports the model, which imports this

            load_text_weights(self.transformer, init_from)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.transformer.set_grad_checkpointing(enable)

    def forward(self, tokens: Tensor) -> Tensor:
        """Projected text features [B, output_dim] of token ids [B, L], L <= context_length."""
        if tokens.shape[-1] > self.context_length:
            raise ValueError(
                f"text tokens have length {tokens.shape[-1]} but the tower's context_length is "
                f"{self.context_length}; tokenize with build_tokenizer({self.context_length}) or shorter"
            )
        text = self.transformer
        # As TextTransformer.forward, but with the causal mask cut to the input length, so that
        # captions shorter than the context (CLIPA text reduction) cost proportionally less.
        x, causal_mask = text._embeds(tokens)
        length = tokens.shape[-1]
        x = text.transformer(x, attn_mask=causal_mask[:length, :length])
        pooled = text_global_pool(text.ln_final(x), tokens, pool_type="argmax")
        return pooled @ text.text_projection  # a [width, output_dim] Parameter (no bias)
