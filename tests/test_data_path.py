"""The data path: images decoded once (at a reduced size where the crops allow), cropped and resized as
uint8 tensors, equal to Pillow's float pipeline within resampling tolerance."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F

from aclip.datamodules import images as images_module
from aclip.datamodules.datamodule import ImageTextDataset
from aclip.datamodules.images import BAD_COUNT, BadSample, open_image
from aclip.datamodules.synthetic import SyntheticCaptions
from aclip.datamodules.transforms import EvalTransform, MultiViewTransform, _with_mask


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients with detail at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    coarse = np.asarray(
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height))
    )
    pixels = coarse * 0.7 + np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 60
    pixels += rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 92) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return buffer


def pillow_reference(image: Image.Image, crop, size: int) -> torch.Tensor:
    """The float pipeline it replaces: Pillow's antialiased bicubic resized crop, as 0-255 floats."""
    top, left, height, width = crop
    resized = TF.resized_crop(
        image, top, left, height, width, [size, size], InterpolationMode.BICUBIC, antialias=True
    )
    return TF.pil_to_tensor(resized).float()


def enclosing_of(crops) -> tuple[int, int, int, int]:
    """The smallest (top, left, height, width) rectangle holding every crop: the teacher's crop."""
    top, left = min(c[0] for c in crops), min(c[1] for c in crops)
    bottom, right = max(c[0] + c[2] for c in crops), max(c[1] + c[3] for c in crops)
    return top, left, bottom - top, right - left


def crops_of(transform: MultiViewTransform, seed: int, height: int, width: int):
    torch.manual_seed(seed)
    return transform._crops(height, width)


@pytest.mark.parametrize("num_views", [1, 2])
def test_views_and_teacher_crop_equal_pillows_within_resampling_tolerance(num_views):
    image = photo(200, 150)
    transform = MultiViewTransform(64, num_views=num_views, ema_image_size=48)
    for seed in range(4):
        crops = crops_of(transform, seed, 150, 200)
        torch.manual_seed(seed)
        out = transform(image)
        for view, crop in zip(out["images"], crops, strict=True):
            difference = (view.float() - pillow_reference(image, crop, 64)).abs()
            assert difference.mean() < 0.1 and difference.max() <= 2, (difference.mean(), difference.max())
        teacher = pillow_reference(image, enclosing_of(crops), 48)
        assert (out["ema_image"].float() - teacher).abs().mean() < 0.1


def test_a_large_jpeg_decodes_at_a_reduced_size_and_looks_the_same(monkeypatch):
    """A 1600 x 1200 photo whose 64 px views come from crops of 800 px and more: decoded 8 times smaller in
    the DCT domain (an eighth of the pixels' work), the views barely change."""
    image = photo(1600, 1200)
    data = jpeg(image).getvalue()
    reductions = []
    decode = images_module.decode_pixels

    def spy(image, reduce=1):
        reductions.append(reduce)
        return decode(image, reduce)

    monkeypatch.setattr("aclip.datamodules.transforms.decode_pixels", spy)
    transform = MultiViewTransform(64, num_views=2, crop_scale=(0.5, 1.0))
    full = MultiViewTransform(64, num_views=2, crop_scale=(0.5, 1.0))
    for seed in range(3):
        torch.manual_seed(seed)
        reduced = transform(open_image(io.BytesIO(data), "big.jpg"))
        torch.manual_seed(seed)
        reference = full(images_module.decode_pixels(open_image(io.BytesIO(data), "big.jpg")))
        assert torch.equal(reduced["boxes"], reference["boxes"])
        difference = (reduced["images"].float() - reference["images"].float()).abs().mean()
        assert difference < 3.0, difference  # of 255: DCT-domain scaling against an antialiased resize
    assert reductions and all(reduce == 8 for reduce in reductions)


def test_small_images_and_other_formats_are_decoded_whole():
    transform = MultiViewTransform(64, num_views=2)
    crops = crops_of(transform, 0, 120, 160)
    enclosing = (0, 0, 120, 160)
    assert transform._reduction(crops, enclosing) == 1
    png = io.BytesIO()
    photo(400, 300).save(png, "PNG")
    png.seek(0)
    torch.manual_seed(0)
    out = MultiViewTransform(32, num_views=1)(open_image(png, "a.png"))
    assert out["images"].dtype == torch.uint8 and out["images"].shape == (1, 3, 32, 32)


def test_the_teacher_crop_is_left_out_when_nothing_reads_it(train_config):
    cfg = train_config("method=clip", "debug=fast_dev_run", "evaluation.at_end=false")
    module, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, logger=False)
    assert not module.needs_teacher_crop
    trainer.fit(module, datamodule=datamodule)
    assert not datamodule.view_transform.teacher_crop
    batch = next(iter(datamodule.train_dataloader()))
    assert "ema_image" not in batch and batch["images"].dtype == torch.uint8
    aclip = instantiate(train_config("method=aclip").model)
    assert aclip.needs_teacher_crop


def test_a_jpeg_truncated_after_its_header_is_a_bad_sample_found_at_decoding(tmp_path):
    """Opening reads the header only: a truncated file passes it, and decoding (in the transform) finds
    it. The training dataset skips it like any bad sample and counts it at its index."""
    good, broken = tmp_path / "good.jpg", tmp_path / "broken.jpg"
    good.write_bytes(jpeg(photo(80, 60)).getvalue())
    broken.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    image = open_image(str(broken))
    with pytest.raises(BadSample, match="cannot decode image"):
        MultiViewTransform(32)(image)

    class Pair(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            return open_image(str(broken if index == 0 else good)), f"caption {index}"

    def prepare(image, caption):
        return {**MultiViewTransform(32)(image), "caption": caption}

    dataset = ImageTextDataset(Pair(), prepare)
    first = dataset[0]
    assert first["caption"] == "caption 1" and first[BAD_COUNT] == 1


def test_evaluation_images_are_uint8_pixels_resized_as_pillow_resizes():
    image = photo(90, 60)
    pixels = EvalTransform(32)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    reference = TF.pil_to_tensor(TF.center_crop(TF.resize(image, 32, InterpolationMode.BICUBIC), 32)).float()
    assert (pixels.float() - reference).abs().mean() < 0.6


def pillow_pixels(data: bytes) -> torch.Tensor:
    """Pillow's own RGB decoding of an encoded image, [3, H, W] uint8: the reference of every decoder."""
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def counting_decoder(monkeypatch) -> list:
    """Replace the fast JPEG decoder by a wrapper that records each call; returns the record."""
    calls, decode = [], images_module._decode_jpeg
    if decode is None:
        pytest.skip("the `fast` extra (torchcodec) is not installed")

    def spy(data, mode):
        calls.append(len(data))
        return decode(data, mode=mode)

    monkeypatch.setattr(images_module, "_decode_jpeg", spy)
    return calls


def encoded(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "variant", ["4:2:0", "4:4:4", "progressive", "greyscale", "from a file"], ids=lambda v: v
)
def test_whole_jpegs_are_decoded_by_torchcodec_pixel_for_pixel_as_pillow(monkeypatch, tmp_path, variant):
    calls = counting_decoder(monkeypatch)
    image = photo(120, 90)
    data = {
        "4:4:4": lambda: encoded(image, subsampling=0),
        "progressive": lambda: encoded(image, progressive=True),
        "greyscale": lambda: encoded(image.convert("L")),
    }.get(variant, lambda: encoded(image, subsampling=2))()
    if variant == "from a file":
        (tmp_path / "a.jpg").write_bytes(data)
        opened = open_image(tmp_path / "a.jpg")
    else:
        opened = open_image(io.BytesIO(data), "a.jpg")
    pixels = images_module.decode_pixels(opened)
    assert calls == [len(data)]
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, pillow_pixels(data))


def test_jpegs_the_fast_decoder_cannot_match_are_left_to_pillow(monkeypatch):
    """Truncated files keep Pillow's error (a bad sample), CMYK keeps Pillow's colour conversion, a
    photo with an EXIF orientation stays as stored (torchcodec would turn it upright, away from the
    size its crops are drawn from), a reduced-size decode keeps Pillow's DCT scaling, and a stream the
    fast decoder rejects is Pillow's to judge."""
    calls = counting_decoder(monkeypatch)
    image = photo(160, 120)
    whole = encoded(image)
    for orientation in (3, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        oriented = encoded(image, exif=exif.tobytes())
        decoded = images_module.decode_pixels(open_image(io.BytesIO(oriented), "turned.jpg"))
        assert torch.equal(decoded, pillow_pixels(oriented)) and decoded.shape == (3, 120, 160)
    with pytest.raises(BadSample, match="cannot decode image"):
        images_module.decode_pixels(open_image(io.BytesIO(whole[: len(whole) * 2 // 3]), "cut.jpg"))
    cmyk = encoded(image.convert("CMYK"))
    decoded = images_module.decode_pixels(open_image(io.BytesIO(cmyk), "c.jpg"))
    assert torch.equal(decoded, pillow_pixels(cmyk))
    assert images_module.decode_pixels(open_image(io.BytesIO(whole), "a.jpg"), reduce=2).shape == (3, 60, 80)
    assert calls == []

    def rejects(data, mode):
        raise RuntimeError("unsupported JPEG process")

    monkeypatch.setattr(images_module, "_decode_jpeg", rejects)
    decoded = images_module.decode_pixels(open_image(io.BytesIO(whole), "a.jpg"))
    assert torch.equal(decoded, pillow_pixels(whole))


def test_object_masks_are_cut_in_the_pixels_resize_channel_for_channel_as_alone():
    """The built-in renderer draws pixels and mask as channels of one buffer, which the views cut in one
    resize per crop, with no copy; a mask stored apart is copied beside the pixels; both give exactly
    what resizing the mask alone gives."""
    pixels, _, extras = SyntheticCaptions(size=4, image_size=64, object_masks=True)[1]
    mask = extras["object_mask"]
    assert _with_mask(pixels, mask).data_ptr() == pixels.data_ptr()  # a view of the renderer's buffer
    apart = pixels.permute(1, 2, 0).contiguous().permute(2, 0, 1), mask.clone()
    assert _with_mask(*apart).data_ptr() not in (apart[0].data_ptr(), apart[1].data_ptr())
    transform = MultiViewTransform(32, num_views=2, ema_image_size=24)
    crops = crops_of(transform, 0, 64, 64)
    for inputs in [(pixels, mask), apart]:
        torch.manual_seed(0)
        out = transform(*inputs)
        for view, crop in zip(out["object_masks"], crops, strict=True):
            alone = F.resized_crop(mask[None], *crop, [32, 32], InterpolationMode.BICUBIC, antialias=True)
            assert torch.equal(view, alone[0])
        teacher = F.resized_crop(
            mask[None], *enclosing_of(crops), [24, 24], InterpolationMode.BICUBIC, antialias=True
        )
        assert torch.equal(out["ema_object_mask"], teacher[0])
        torch.manual_seed(0)
        assert torch.equal(out["images"], transform(pixels)["images"])
    with pytest.raises(ValueError, match="object_mask must be uint8 of the image's size 64 x 64"):
        transform(pixels, mask[:32])
    with pytest.raises(ValueError, match=r"must be uint8 .* got torch\.float32"):
        transform(pixels, mask.float() / 255)
    with pytest.raises(ValueError, match="uint8 RGB"):
        transform(pixels.float(), mask)
