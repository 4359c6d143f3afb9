"""Built-in, procedurally generated image-caption data: no files, deterministic by seed.

Each image shows one or two captioned objects, a saturated colour times a shape ("red circle", 24
classes), on a mid-dark textured background among desaturated clutter. It is built so that token
removal matters for a tiny CLIP trained on a CPU in minutes: each object covers only a minority of the
image (about 6-25% of the area), so which patches a policy keeps decides whether the model sees the
object at all. Clutter is never saturated, so it can never be mistaken for a class object, but it fills
the image with busy patches that carry no caption information.

Three variants share the scene sampling, rendering and captioning (``variant``): "shapes" (the above),
"glyphs" (letters and digits in any hue among the same clutter, captions naming the glyphs) and
"segments" (seven-segment digits in thin strokes on a noisy, high-frequency ground among loose grey
strokes of the same widths: an object's identity needs most of its patches, as in small real data).

Each variant comes as three datasets (`datasets`):

* :class:`SyntheticCaptions`: ``(image, caption)`` training pairs.
* :class:`SyntheticClassification`: zero-shot classification, one object per image, balanced labels.
* :class:`SyntheticRetrieval`: image-text retrieval, several different captions per image.

Its modules by job, each importing only those before it: `captions` (the variants' classes, prompts and
caption templates, and captioning), `objects` (what a scene holds and the pixels each object covers),
`scenes` (scene sampling, each variant's `VARIANTS` entry), `rendering` (a scene drawn into pixels) and
`datasets`.
"""

from aclip.datamodules.synthetic.captions import (
    CLASSNAMES,
    COLOURS,
    GLYPH_CLASSNAMES,
    GLYPH_PROMPT_TEMPLATES,
    GLYPHS,
    PROMPT_TEMPLATES,
    SEGMENT_CLASSNAMES,
    SEGMENT_DIGITS,
    SEGMENT_PROMPT_TEMPLATES,
    SHAPES,
)
from aclip.datamodules.synthetic.datasets import (
    SyntheticCaptions,
    SyntheticClassification,
    SyntheticRetrieval,
)
from aclip.datamodules.synthetic.objects import SEGMENTS_LIT

__all__ = [
    "CLASSNAMES",
    "COLOURS",
    "GLYPHS",
    "GLYPH_CLASSNAMES",
    "GLYPH_PROMPT_TEMPLATES",
    "PROMPT_TEMPLATES",
    "SEGMENTS_LIT",
    "SEGMENT_CLASSNAMES",
    "SEGMENT_DIGITS",
    "SEGMENT_PROMPT_TEMPLATES",
    "SHAPES",
    "SyntheticCaptions",
    "SyntheticClassification",
    "SyntheticRetrieval",
]
