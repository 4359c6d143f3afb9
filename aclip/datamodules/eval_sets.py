"""Downstream evaluation sets on disk: class-per-folder image sets and Karpathy-split caption sets.

Unlike the training sources, an evaluation set must be complete: an image that cannot be read is an
error naming the file, never a skipped sample, so that every model is scored on the same items.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from aclip.datamodules.images import BadSample, load_rgb

__all__ = ["ImageFolderClassification", "KarpathyRetrieval", "load_eval_image"]

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def check_images(paths: Sequence[Path], what: str, threads: int = 16) -> None:
    """Open every image's header (in threads), so that a missing or unreadable evaluation image stops
    the run at start-up, naming the files, not after training. (A file truncated after its header is
    still found only when it is decoded.)"""

    def unreadable(path: Path) -> str | None:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018  (the header is parsed by Image.open; the size proves it)
        except (OSError, ValueError, SyntaxError) as error:
            return f"{path} ({type(error).__name__}: {error})"
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        bad = [problem for problem in pool.map(unreadable, paths) if problem]
    if bad:
        examples = "\n  ".join(bad[:5])
        raise OSError(
            f"{len(bad)} of the {len(paths)} images of {what} cannot be read, e.g.\n  {examples}\n"
            "an evaluation set must be complete: fix or restore these files, or leave the set out of `eval`"
        )


def load_eval_image(path: str | Path) -> Image.Image:
    """The 8-bit RGB image at `path`; raises OSError naming the file if it cannot be read."""
    try:
        return load_rgb(path)
    except BadSample as error:
        # Not BadSample: that one means "skip me" to the training pipeline.
        raise OSError(f"unreadable evaluation image {error}") from None


class ImageFolderClassification(ImageFolder):
    """Images under `root/<class folder>/`, items `(PIL RGB image, label)`.

    Labels follow the sorted folder names, which are kept in `classes`; any image mode is converted to
    RGB (see :func:`aclip.datamodules.images.to_rgb`).
    """

    def __init__(self, root: str | Path) -> None:
        try:
            super().__init__(root, loader=load_eval_image)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error}\nPoint evaluation.sets.<name>.dataset.root (train.root/test.root for a linear "
                "probe) at a folder holding one sub-folder of images per class; see docs/evaluation.md."
            ) from None

    def check(self) -> None:
        """Raise OSError, naming them, if any of the set's images cannot be opened."""
        check_images([Path(path) for path, _ in self.samples], f"the image folder {self.root}")


class KarpathyRetrieval(Dataset):
    """One split of a Karpathy-split caption set (`dataset_flickr30k.json`, `dataset_coco.json`).

    Items are the split's PIL RGB images in file order; `captions[i]` lists every caption of image i.
    An image lies at `image_root/<filepath>/<filename>`, `filepath` (COCO's "val2014", ...) if given.
    """

    def __init__(self, annotations: str | Path, image_root: str | Path, split: str = "test") -> None:
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"split must be one of {KARPATHY_SPLITS}, got {split!r}")
        annotations, image_root = Path(annotations), Path(image_root)
        for path, key in ((annotations, "annotations"), (image_root, "image_root")):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found; set evaluation.sets.<name>.dataset.{key}")
        entries = [e for e in json.loads(annotations.read_text())["images"] if e["split"] == split]
        if not entries:
            raise ValueError(f"{annotations} has no image in split {split!r}")
        self.paths = [image_root / entry.get("filepath", "") / entry["filename"] for entry in entries]
        self.captions: list[list[str]] = [_captions(entry, annotations) for entry in entries]

    def __len__(self) -> int:
        return len(self.paths)

    def check(self) -> None:
        """Raise OSError, naming them, if any of the split's images cannot be opened."""
        check_images(self.paths, f"this caption set's split under {self.paths[0].parent}")

    def __getitem__(self, index: int) -> Image.Image:
        return load_eval_image(self.paths[index])


def _captions(entry: dict, annotations: Path) -> list[str]:
    captions = [sentence["raw"].strip() for sentence in entry["sentences"]]
    if not captions or not all(captions):
        raise ValueError(f"{annotations}: image {entry['filename']} has a missing or empty caption")
    return captions
