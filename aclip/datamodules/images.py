"""Decoding images from real data: any mode in, 8-bit RGB out, and one error type for what cannot be used.

Web-scale image-text data always holds some files that are missing, truncated, corrupt or not an image,
and captions that are empty. Training sources raise :class:`BadSample` for those; the training dataset
skips them and counts them (see :class:`aclip.datamodules.datamodule.ImageTextDataset`), and the
:class:`aclip.callbacks.data_quality.BadSampleMonitor` stops a run whose bad share is too high.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image
from torch import Tensor

try:  # the `fast` extra: libjpeg-turbo through torch, about 0.3 ms faster per web-size JPEG than Pillow
    from torchcodec.decoders import decode_jpeg as _decode_jpeg
except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch: Pillow decodes
    _decode_jpeg = None

# The first bytes of every JPEG file (the start-of-image marker and the next marker's 0xFF), and the
# end-of-image marker that a complete file ends with.
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"

# The largest encoded image accepted. Pillow warns from 89 megapixels on (`Image.MAX_IMAGE_PIXELS`), and
# such a photo takes 20 to 45 MB as a JPEG of quality 90 to 95: a larger file is no training image, and
# reading it whole (or letting Pillow scan it for markers) would stall its dataloader worker for seconds.
MAX_ENCODED_BYTES = 64 * 2**20

# Whole-file errors Pillow raises for unreadable data (UnidentifiedImageError and truncation are OSErrors).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class BadSample(Exception):
    """A sample that cannot be trained on: `name` says which one (a path or shard key), `reason` why.

    `count` is how many samples it stands for: 1, or the members lost with an unreadable shard.
    """

    def __init__(self, name: str, reason: str, count: int = 1) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.count = name, reason, count


# Every training sample carries how many bad samples were counted in its place, how many samples were
# read for it, and the bad ones' names (joined by newlines), so that the counts survive dataloader
# workers and collation; `aclip.callbacks.data_quality.BadSampleMonitor` consumes them.
BAD_COUNT = "bad_samples"
READ_COUNT = "samples_read"
BAD_NAMES = "bad_names"


def skip_record(bad: Sequence[BadSample], read: int = 1) -> dict[str, Any]:
    """The bad-sample fields of a training sample: `bad` were counted in its place among `read` samples
    read for it (1 for a map-style dataset's index; 1 plus the skipped ones for a stream)."""
    return {
        BAD_COUNT: sum(sample.count for sample in bad),
        READ_COUNT: read,
        BAD_NAMES: "\n".join(f"{sample.name} ({sample.reason})" for sample in bad),
    }


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any mode.

    Greyscale is replicated, CMYK and palette images are converted, transparent images are composited
    on white (dropping alpha would turn transparent regions into whatever colour they happen to hold),
    and 16- or 32-bit integer greyscale is scaled to 8 bits (Pillow's own conversion clips at 255).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        grey = np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_errors(name: str) -> contextlib.AbstractContextManager:
    """Turn what Pillow raises for an unusable file into `BadSample(name, ...)`."""

    @contextlib.contextmanager
    def translated() -> Iterator[None]:
        try:
            with warnings.catch_warnings():
                # Pillow warns about (and then refuses) decompression bombs; the error below is what counts.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        except FileNotFoundError:
            raise BadSample(name, "file not found") from None
        except Image.UnidentifiedImageError:  # its message names the file object, not the file
            raise BadSample(name, "cannot decode image (not in any format Pillow reads)") from None
        except _DECODE_ERRORS as error:
            raise BadSample(name, f"cannot decode image ({type(error).__name__}: {error})") from None

    return translated()


def open_image(file: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open `file` (a path or a binary file object) without decoding its pixels: Pillow reads the header
    only, so that the decoder can still be told to decode at a reduced size (`decode_pixels`).

    A JPEG file is read into memory whole: one read instead of Pillow's chunked ones, no file left open
    until the pixels are decoded, and the encoded bytes at hand for the faster decoder; other files are
    left to Pillow, which reads their header only. The image's `filename` is `name` (default: the
    path), which names it in later errors.

    Raises:
        BadSample: the file is missing, is not an image, or holds more than `MAX_ENCODED_BYTES`.
    """
    name = name or (str(file) if isinstance(file, (str, Path)) else getattr(file, "name", "image data"))
    with _decode_errors(name):
        if isinstance(file, (str, Path)):
            with open(file, "rb") as handle:
                _check_encoded_size(os.fstat(handle.fileno()).st_size, name)
                start = handle.read(len(_JPEG_START))
                if start == _JPEG_START:
                    # Bounded: a pipe or a file growing under us reports no (or a stale) size.
                    data = start + handle.read(MAX_ENCODED_BYTES + 1 - len(start))
                    _check_encoded_size(len(data), name)
                    file = io.BytesIO(data)
        elif isinstance(file, io.BytesIO):
            _check_encoded_size(file.getbuffer().nbytes, name)
        image = Image.open(file)
    image.filename = name
    return image


def _check_encoded_size(size: int, name: str) -> None:
    if size > MAX_ENCODED_BYTES:
        raise BadSample(
            name,
            f"{size / 2**20:.0f} MiB, more than an image file may hold ({MAX_ENCODED_BYTES // 2**20} MiB)",
        )


def _whole_jpeg(image: Image.Image) -> bytes | None:
    """The encoded bytes of an opened, not yet decoded RGB or greyscale JPEG held in memory, when they
    end with the end-of-image marker and no EXIF orientation is set; None otherwise. Truncated files,
    trailing bytes, other formats and modes are left to Pillow, whose errors and colour conversions are
    the reference, and so are oriented photos: torchcodec turns them upright, Pillow (like every crop
    drawn from the stored size) does not."""
    file = getattr(image, "fp", None)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not image.tile:
        return None
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        return None
    data = file.getvalue() if isinstance(file, io.BytesIO) else b""
    return data if data.endswith(_JPEG_END) else None


def decode_pixels(image: Image.Image, reduce: int = 1) -> Tensor:
    """The 8-bit RGB pixels [3, H, W] of an opened image (uint8 tensor), decoded now.

    `reduce` (a power of 2) lets a JPEG decode at up to that factor smaller, in its DCT domain, where
    most of the decoding work goes; the size obtained is the image's new `size`. The tensor is a view of
    the decoder's [H, W, 3] buffer (channels last in memory), which torch's antialiased resize reads two
    to three times faster than planar [3, H, W] storage.

    Raises:
        BadSample: the data is truncated or corrupt (these only show when the pixels are read).
    """
    if reduce == 1 and _decode_jpeg is not None and (data := _whole_jpeg(image)) is not None:
        try:  # the same libjpeg-turbo decoding as Pillow's, pixel for pixel, without Pillow's copies
            return _decode_jpeg(data, mode="RGB")
        except RuntimeError:
            pass  # a corrupt stream: Pillow decides whether it is usable, and says why not
    with _decode_errors(getattr(image, "filename", "") or "image"):
        if reduce > 1 and image.format == "JPEG":
            width, height = image.size
            image.draft("RGB", (width // reduce, height // reduce))  # Pillow decodes at least this size
        image.load()
        pixels = np.asarray(to_rgb(image))  # read-only: Pillow's buffer, which nothing writes to
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            return torch.from_numpy(pixels).permute(2, 0, 1)


def load_rgb(file: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open, fully decode and convert `file` (a path or a binary file object) to 8-bit RGB.

    Raises:
        BadSample: the file is missing, truncated, corrupt or not an image; `name` (default: the path)
            identifies it in the message.
    """
    image = open_image(file, name)
    with _decode_errors(image.filename), image:
        image.load()  # decode now: truncation and corruption only show when the pixels are read
        return to_rgb(image).copy()


def clean_caption(caption: str | None, name: str) -> str:
    """`caption` with surrounding white space removed; raises :class:`BadSample` if nothing is left."""
    text = (caption or "").strip()
    if not text:
        raise BadSample(name, "empty caption")
    return text


def random_caption(captions: Sequence[str | None], name: str) -> str:
    """One of the non-blank `captions`, drawn at random; raises :class:`BadSample` if all are blank."""
    texts = [text.strip() for text in captions if text and text.strip()]
    return clean_caption(random.choice(texts) if texts else None, name)
