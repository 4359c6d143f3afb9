"""YFCC-15M in SLIP's layout: a metadata pickle and JPEGs packed into zip shards."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from aclip.datamodules.images import BadSample, open_image, random_caption


def shard_member(index: int) -> tuple[str, str]:
    """SLIP's address of image `index`: (zip file relative to the image folder, member name).

    The index is zero-padded to 8 digits `abcdefgh`; the image is `fgh.jpg` in `ab/cde.zip`.
    """
    padded = f"{index:08d}"
    return f"{padded[:2]}/{padded[2:5]}.zip", f"{padded[5:]}.jpg"


class Yfcc15mCaptions(Dataset):
    """(image, caption) pairs of YFCC-15M as SLIP distributes them.

    `path` is a pickle of a list of `(index, title, description)` tuples; image `index` lies in a zip
    shard under `<root>/images/` (see `shard_member`). Each access captions the image with its title or
    its description, drawn at random among those that are not blank. A missing image or shard, or an
    image without either text, raises :class:`~aclip.datamodules.images.BadSample` when accessed.

    Unpickling runs code from the file: only point `path` at a metadata file you trust.

    Args:
        path: the metadata pickle (SLIP's `yfcc15m.pkl`).
        root: the folder holding `images/` (default: the pickle's folder).
        max_open_shards: zip files each process keeps open; reopening one re-reads its whole index.
    """

    def __init__(self, path: str | Path, root: str | Path | None = None, max_open_shards: int = 64) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"YFCC-15M metadata {path} does not exist; set data.train.path")
        root = Path(root) if root is not None else path.parent
        self.images = root / "images"
        if not self.images.is_dir():
            raise FileNotFoundError(
                f"{self.images} is not a directory; set data.train.root to the folder holding images/"
            )
        with path.open("rb") as file:
            self.samples: list[tuple[int, str, str]] = pickle.load(file)
        if not isinstance(self.samples, list) or not self.samples or len(self.samples[0]) != 3:
            raise ValueError(f"{path} must hold a non-empty list of (index, title, description) tuples")
        if max_open_shards < 1:
            raise ValueError(f"data.train.max_open_shards must be >= 1, got {max_open_shards}")
        self.max_open_shards = max_open_shards
        self._shards: OrderedDict[str, zipfile.ZipFile] = OrderedDict()
        self._shards_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        image_index, title, description = self.samples[index]
        shard, member = shard_member(image_index)
        name = f"{self.images / shard}:{member}"
        caption = random_caption((title, description), name)
        try:
            data = self._shard(shard).read(member)
        except FileNotFoundError:
            raise BadSample(name, "zip shard not found") from None
        except KeyError:
            raise BadSample(name, "not in its zip shard") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
            raise BadSample(name, f"cannot read zip shard ({type(error).__name__}: {error})") from None
        return open_image(io.BytesIO(data), name), caption

    def _shard(self, shard: str) -> zipfile.ZipFile:
        """The open zip file `shard`, from a per-process cache of the most recently used ones."""
        if self._shards_pid != os.getpid():
            # Handles inherited through a fork share their file offset with the parent's: open new ones.
            self._shards, self._shards_pid = OrderedDict(), os.getpid()
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        handle = zipfile.ZipFile(self.images / shard)
        self._shards[shard] = handle
        if len(self._shards) > self.max_open_shards:
            self._shards.popitem(last=False)[1].close()
        return handle

    def __getstate__(self) -> dict[str, Any]:
        # Dataloader workers started by spawn get a pickled copy: open zip files cannot travel.
        return {**self.__dict__, "_shards": OrderedDict(), "_shards_pid": None}
