"""CLIP's byte-pair tokenizer, read from the vocabulary file shipped inside open_clip (no network), with
CLIPA's text token reductions; shared by the model (evaluation prompts) and the data (training captions).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import open_clip.tokenizer
from open_clip.tokenizer import SimpleTokenizer

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


class TextReduction:
    """How the training captions are cut to `length` tokens, start and end-of-text included (CLIPA's
    text token reduction): `tokenizer()` applies it. One subclass per reduction, named by the
    `text_masking` configs (`_target_`); shorter than the text tower's context means fewer tokens."""

    reduction: ClassVar[str]

    def __init__(self, length: int = 77) -> None:
        self.length = length

    def tokenizer(self) -> SimpleTokenizer:
        """The tokenizer of the training captions (`build_tokenizer`, which checks `length`)."""
        return build_tokenizer(self.length, self.reduction)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


class Truncate(TextReduction):
    """Keep the first tokens that fit, end-of-text last (CLIP's default; CLIPA "truncate")."""

    reduction = "truncate"


class RandomTokens(TextReduction):
    """Keep a random subset of a long caption's tokens, in their original order (CLIPA "random")."""

    reduction = "random"


class BlockTokens(TextReduction):
    """Keep one contiguous window of a long caption's tokens at a random position (CLIPA "block")."""

    reduction = "block"


class SyntaxTokens(TextReduction):
    """Keep nouns first, then adjectives, then verbs, then the rest, in original order (CLIPA "syntax";
    needs NLTK and its tagger data, offline)."""

    reduction = "syntax"
