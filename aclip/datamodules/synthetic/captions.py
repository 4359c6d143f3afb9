"""The built-in variants' words: their classes and zero-shot prompts, the templates their captions are
written from, and the captioning itself (an object names itself through its `phrases`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 40),
    "blue": (30, 80, 240),
    "yellow": (245, 225, 20),
    "magenta": (225, 30, 225),
    "cyan": (20, 215, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CLASSNAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} among clutter.",
    "there is a {} in the picture.",
    "a small {} on a noisy background.",
    "an image showing a {}.",
    "a picture of a {}.",
    "a cluttered scene with a {}.",
)

# (sentence, object phrase): the sentence takes the joined object phrases as {objs} and "is"/"are" as
# {be}; each phrase gets its own article. The wording matches PROMPT_TEMPLATES where it can, so the
# zero-shot prompts are in-distribution text.
CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a photo of {objs}.", "{colour} {shape}"),
    ("{objs} among clutter.", "{colour} {shape}"),
    ("there {be} {objs} in the picture.", "{colour} {shape}"),
    ("{objs} on a noisy background.", "small {colour} {shape}"),
    ("an image showing {objs}.", "{colour} {shape}"),
    ("a picture of {objs}.", "{colour} {shape}"),
    ("a cluttered scene with {objs}.", "{colour} {shape}"),
    ("{objs}.", "{shape} coloured {colour}"),
)


GLYPHS: str = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O, which read as 1 and 0
GLYPH_CLASSNAMES: tuple[str, ...] = tuple(
    f"digit {glyph}" if glyph.isdigit() else f"letter {glyph}" for glyph in GLYPHS
)
GLYPH_PROMPT_TEMPLATES: tuple[str, ...] = PROMPT_TEMPLATES
GLYPH_CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a photo of {objs}.", "{name}"),
    ("{objs} among clutter.", "{name}"),
    ("there {be} {objs} in the picture.", "{name}"),
    ("{objs} on a noisy background.", "small {name}"),
    ("an image showing {objs}.", "{name}"),
    ("a picture of {objs}.", "{name}"),
    ("a cluttered scene with {objs}.", "{name}"),
    ("{objs} written in colour.", "{name}"),
)

# Seven-segment digits: an object's identity is the arrangement of its strokes, and most digits differ
# from another in one or two segments (8 from 0, 6 and 9; 7 from 1; 3 from 9), so a view that drops a
# few of its patches often cannot tell which digit it is. The clutter is loose strokes of the same widths
# and brightness, desaturated as all clutter: a stroke's colour marks a digit, but which digit it is
# needs the arrangement of its strokes.
SEGMENT_DIGITS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
SEGMENT_CLASSNAMES: tuple[str, ...] = tuple(f"digit {name}" for name in SEGMENT_DIGITS)
SEGMENT_PROMPT_TEMPLATES: tuple[str, ...] = PROMPT_TEMPLATES
SEGMENT_CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    *GLYPH_CAPTION_TEMPLATES[:7],
    ("{objs} drawn in thin strokes.", "{name}"),
)


class Captioned(Protocol):
    """An object a caption can name: the words a caption template takes (`{colour}`, `{shape}`, `{name}`)."""

    @property
    def phrases(self) -> dict[str, str]: ...


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _caption(objects: Sequence[Captioned], template: tuple[str, str]) -> str:
    """Caption ``objects`` (in this order) with one of their variant's caption templates."""
    sentence, phrase = template
    phrases = [phrase.format(**obj.phrases) for obj in objects]
    joined = " and ".join(f"{_article(p)} {p}" for p in phrases)
    return sentence.format(objs=joined, be="is" if len(objects) == 1 else "are")


def sample_captions(
    objects: Sequence[Captioned],
    rng: np.random.Generator,
    k: int,
    caption_templates: Sequence[tuple[str, str]],
) -> list[str]:
    """``k`` captions of a scene's ``objects`` with distinct templates of its variant's
    ``caption_templates``, each listing the objects in random order."""
    templates = rng.choice(len(caption_templates), size=k, replace=False)
    captions = []
    for template in templates.tolist():
        order = rng.permutation(len(objects)).tolist()
        captions.append(_caption([objects[j] for j in order], caption_templates[template]))
    return captions
