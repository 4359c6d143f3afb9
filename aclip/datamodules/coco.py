"""COCO Captions as training pairs: one of each image's captions, drawn anew at every access."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from aclip.datamodules.images import open_image, random_caption


class CocoCaptions(Dataset):
    """(image, caption) pairs from a COCO captions file such as `captions_train2017.json`.

    The JSON holds `images: [{id, file_name}, ...]` and `annotations: [{image_id, caption}, ...]`;
    image files lie at `<root>/<file_name>`. There is one sample per image with at least one caption,
    and each access captions it with one of its non-blank captions at random, so an epoch sees one
    caption per image. An unreadable image, or one whose captions are all blank, raises
    :class:`~aclip.datamodules.images.BadSample` when accessed.

    Args:
        path: the captions JSON.
        root: the image folder (e.g. `train2017/`).
    """

    def __init__(self, path: str | Path, root: str | Path) -> None:
        path, self.root = Path(path), Path(root)
        if not path.is_file():
            raise FileNotFoundError(f"COCO captions file {path} does not exist; set data.train.path")
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.root} is not a directory; set data.train.root")
        with path.open(encoding="utf-8") as file:
            data = json.load(file)
        if not isinstance(data, dict) or not {"images", "annotations"} <= data.keys():
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{path} is not a COCO captions file: need 'images' and 'annotations', got {found}"
            )
        captions: dict[int, list[str]] = defaultdict(list)
        for annotation in data["annotations"]:
            captions[annotation["image_id"]].append(annotation["caption"])
        self.samples = [
            (image["file_name"], captions[image["id"]]) for image in data["images"] if image["id"] in captions
        ]
        if not self.samples:
            raise ValueError(f"{path} has no captioned images")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        file, captions = self.samples[index]
        name = str(self.root / file)
        caption = random_caption(captions, name)
        return open_image(name), caption
