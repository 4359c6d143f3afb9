"""Image-caption pairs listed in a CSV or TSV file, as open_clip reads them (`--csv-img-key` etc.)."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from aclip.datamodules.images import clean_caption, open_image


class CsvCaptions(Dataset):
    """(image, caption) pairs from a table with a header row: one row per pair.

    Each row names an image file (column `image_column`, relative to `root` or absolute) and its
    caption (column `caption_column`); other columns are ignored. A row whose image cannot be read or
    whose caption is empty raises :class:`~aclip.datamodules.images.BadSample` when accessed.

    Args:
        path: the CSV/TSV file.
        root: folder that relative image paths start from (default: the file's folder).
        image_column, caption_column: header names of the two columns (open_clip's defaults).
        separator: field separator (default: a tab for a `.tsv` file, else a comma).
        encoding: the file's text encoding (UTF-8, with or without a byte-order mark, by default).
    """

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        image_column: str = "filepath",
        caption_column: str = "title",
        separator: str | None = None,
        encoding: str = "utf-8-sig",
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"caption table {path} does not exist; set data.train.path to a CSV/TSV file"
            )
        self.root = Path(root) if root is not None else path.parent
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image root {self.root} is not a directory; set data.train.root to the folder the "
                f"image paths in {path} are relative to"
            )
        if separator is None:
            separator = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(newline="", encoding=encoding) as file:
            reader = csv.DictReader(file, delimiter=separator, restval="")
            try:
                columns = reader.fieldnames or []
                if image_column not in columns or caption_column not in columns:
                    raise ValueError(
                        f"{path} needs the columns {image_column!r} and {caption_column!r} (separator "
                        f"{separator!r}) but has {columns}; set data.train.image_column, "
                        "data.train.caption_column or data.train.separator"
                    )
                self.samples = [(row[image_column], row[caption_column]) for row in reader]
            except UnicodeDecodeError:
                line, text = _first_undecodable_line(path, encoding)
                raise ValueError(
                    f"{path} line {line} is not valid {encoding} text ({text!r}): set data.train.encoding "
                    "to the file's encoding (e.g. latin-1 or cp1252), or convert it to UTF-8"
                ) from None
        if not self.samples:
            raise ValueError(f"{path} has a header but no rows")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        file, caption = self.samples[index]
        name = str(self.root / file)  # an absolute `file` replaces the root
        caption = clean_caption(caption, name)
        return open_image(name), caption


def _first_undecodable_line(path: Path, encoding: str) -> tuple[int, bytes]:
    """The number (from 1) and the bytes of the first line of `path` that `encoding` cannot decode."""
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError:
                return number, line.rstrip(b"\r\n")[:80]
    return 0, b""
