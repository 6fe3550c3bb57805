"""diffusers' example preprocessing (utils.infra.image_transforms), checked against torchvision's rules written out
as numbers (torchvision does not import on our pinned stack): Resize(size) truncates the long side, CenterCrop
rounds the offset half to even, ToTensor + Normalize([0.5], [0.5]) is (x / 255 - 0.5) / 0.5; and the families that
use it: Stable Diffusion crops then mirrors, the ControlNet family resizes image and control alike."""

import numpy as np
import pytest
import torch
from PIL import Image

from utils.infra.image_transforms import (
    center_crop_offset,
    crop_batch,
    normalized,
    random_crop_offset,
    resize_center_crop,
    resize_short_side,
)


def ramp(width, height):
    return Image.fromarray((np.arange(width * height * 3) % 253).astype(np.uint8).reshape(height, width, 3))


@pytest.mark.parametrize("size, expected", [
    ((90, 75), (76, 64)),  # landscape: int(64 x 90 / 75) = int(76.8) = 76 (ADM's crop rounds it to 77)
    ((75, 90), (64, 76)),  # portrait
    ((64, 200), (64, 200)),  # already 64 on the short side: kept as it is
    ((101, 33), (195, 64)),  # upscaled: int(64 x 101 / 33) = int(195.88)
])
def test_resize_truncates_the_long_side_like_torchvision(size, expected):
    image = ramp(*size)
    out = resize_short_side(image, 64, "lanczos")
    assert out.size == expected
    if expected != size:
        assert np.array_equal(np.asarray(out), np.asarray(image.resize(expected, Image.LANCZOS)))
    else:
        assert out is image
    bilinear = resize_short_side(image, 64, "bilinear")
    assert expected == size or not np.array_equal(np.asarray(out), np.asarray(bilinear))  # the filter is used


def test_centre_crop_rounds_half_to_even_and_random_crops_cover_every_offset():
    assert center_crop_offset(64, 77, 64) == (0, 6)  # (77 - 64) / 2 = 6.5 -> 6
    assert center_crop_offset(64, 79, 64) == (0, 8)  # 7.5 -> 8
    assert center_crop_offset(75, 64, 64) == (6, 0)  # 5.5 -> 6
    assert random_crop_offset(64, 64, 64, None) == (0, 0)
    offsets = [random_crop_offset(66, 70, 64, torch.Generator().manual_seed(s)) for s in range(300)]
    assert {t for t, _ in offsets} == {0, 1, 2} and {left for _, left in offsets} == set(range(7))
    again = [random_crop_offset(66, 70, 64, torch.Generator().manual_seed(s)) for s in range(300)]
    assert offsets == again  # drawn from the run's generator: a resumed run draws the same


def test_normalised_pixels_are_to_tensor_then_normalize():
    pixels = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).view(1, 1, 6).expand(3, 1, 6)
    expected = ((torch.arange(256, dtype=torch.float32) / 255 - 0.5) / 0.5)[[0, 1, 127, 128, 254, 255]]
    assert torch.equal(normalized(pixels)[0, 0], expected)
    out = normalized(pixels)
    assert out.dtype == torch.float32 and out.min() == -1 and out.max() == 1


def test_sd_crops_then_mirrors_and_sdxl_mirrors_then_crops():
    """On a 17-column margin the two orders differ by a column: SD 1.x (Compose: crop, flip) takes columns 8..23 and
    mirrors them; SDXL/SD3 mirror the resized image and take its columns 8..23 (columns 9..24 of the original)."""
    image = torch.arange(3 * 16 * 33, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 16, 33)
    flips = torch.tensor([True])
    crop_flip, offsets = crop_batch([image], 16, center=True, flips=flips, generator=None, flip_before_crop=False)
    flip_crop, offsets_xl = crop_batch([image], 16, center=True, flips=flips, generator=None, flip_before_crop=True)
    assert offsets == offsets_xl == [(0, 8)]
    assert torch.equal(crop_flip[0], image[:, :, 8:24].flip(-1))
    assert torch.equal(flip_crop[0], image[:, :, 9:25].flip(-1))
    plain, _ = crop_batch([image], 16, center=True, flips=None, generator=None, flip_before_crop=True)
    assert torch.equal(plain[0], image[:, :, 8:24])


def test_the_sd_family_reads_images_as_the_text_to_image_example(tiny_sd_dir):
    """The transform resizes (lanczos; --image_interpolation_mode), the loop crops (random by default,
    --center_crop) and normalises: the rows' pixels are the example's tensor for that crop."""
    from diffusers import StableDiffusionPipeline

    from utils.families.stable_diffusion import StableDiffusion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    image = ramp(23, 16)
    for center, mode, pil in ((True, None, Image.LANCZOS), (False, "bicubic", Image.BICUBIC)):
        family = StableDiffusion(pipe, "cpu", center_crop=center, image_interpolation_mode=mode)
        family.encode_pixels = lambda pixels: pixels
        row = {k: v[0] for k, v in family.transform("image", "text", 8)({"image": [image], "text": ["x"]}).items()}
        batch = family.collate([row, row])
        assert batch["pixel_values"][0].shape == (3, 8, 11)  # int(8 x 23 / 16) = 11
        resized = np.asarray(image.resize((11, 8), pil)).astype(np.float32)
        crops = set()
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            lefts = [random_crop_offset(8, 11, 8, g)[1] for _ in range(2)] if not center else [2, 2]  # round(1.5)
            x = family.rows(batch, torch.Generator().manual_seed(seed)).x
            for k, left in enumerate(lefts):
                expected = torch.from_numpy((resized[:, left:left + 8] / 255 - 0.5) / 0.5).permute(2, 0, 1)
                assert torch.equal(x[k], expected)
                crops.add(left)
        assert len(crops) == 1 if center else len(crops) >= 3


def test_the_controlnet_family_resizes_image_and_control_alike():
    """90 x 75 at 64 px: 76 x 64 (truncated; the old rounding gave 77), centre crop left round(6) = 6; bilinear by
    default as train_controlnet.py; segmentation controls with nearest (no new colours)."""
    from utils.families.controlnet import control_tensor, fit_control, image_tensor

    image = ramp(90, 75)
    expected = np.asarray(image.resize((76, 64), Image.BILINEAR))[:, 6:70]
    assert np.array_equal(np.asarray(resize_center_crop(image, 64)), expected)
    assert torch.equal(image_tensor(image, 64), torch.from_numpy((expected.astype(np.float32) / 255 - 0.5) / 0.5)
                       .permute(2, 0, 1))
    assert torch.equal(control_tensor(image, 64, "canny"), torch.from_numpy(expected.astype(np.float32) / 255)
                       .permute(2, 0, 1))
    lanczos = np.asarray(image.resize((76, 64), Image.LANCZOS))[:, 6:70]
    assert np.array_equal(np.asarray(fit_control(image, 64, "canny", "lanczos")), lanczos)
    nearest = np.asarray(image.resize((76, 64), Image.NEAREST))[:, 6:70]
    assert np.array_equal(np.asarray(fit_control(image, 64, "segmentation", "lanczos")), nearest)
