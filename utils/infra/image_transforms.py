"""diffusers' example preprocessing of training images (train_text_to_image_lora(_sdxl).py,
train_dreambooth_lora(_sdxl/_sd3).py, train_controlnet(_sdxl/_sd3).py), written on PIL and torch because torchvision
does not import on our pinned stack. Each function names the torchvision op it equals, pixel for pixel:

- `resize_short_side`: `transforms.Resize(size, interpolation)` on a PIL image: the short side to `size`, the long
  side `int(size * long / short)` (truncated), PIL's filter of that name; an image already that size is kept.
- `center_crop_offset`: `transforms.CenterCrop(size)`: top = int(round((h - size) / 2)) (round half to even).
- `random_crop_offset`: `transforms.RandomCrop(size).get_params`: top then left, each uniform over the valid range,
  drawn from the run's generator (the examples draw from torch's global one; a resumed run must draw the same).
- `normalized`: `ToTensor()` then `Normalize([0.5], [0.5])`: (x / 255 - 0.5) / 0.5 in float32; `unit`: `ToTensor()`.

The resize runs in the dataset transform (data-loader workers); the crop and the flip run in the training loop
(`crop_batch`), where the run's generator draws them, so that a resumed run repeats an uninterrupted one. DiT keeps
ADM's own preprocessing (`utils.infra.data.center_crop_arr`)."""

import numpy as np
import torch
from PIL import Image

INTERPOLATION_MODES = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                       "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def resize_short_side(image: Image.Image, size: int, interpolation: str = "lanczos") -> Image.Image:
    """torchvision's `Resize(size)`: the short side to `size`, the long side scaled and truncated."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), INTERPOLATION_MODES[interpolation])


def center_crop_offset(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's `CenterCrop(size)`: (top, left), rounded half to even as Python's round."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def random_crop_offset(height: int, width: int, size: int, generator) -> tuple[int, int]:
    """torchvision's `RandomCrop(size).get_params`: top, then left, uniform over the valid offsets."""
    if height == size and width == size:  # as get_params: nothing to draw
        return 0, 0
    device = generator.device if generator is not None else "cpu"
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator, device=device))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator, device=device))
    return top, left


def resize_center_crop(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """`Compose([Resize(size, interpolation), CenterCrop(size)])` on a PIL image (the ControlNet examples' images
    and controls)."""
    image = resize_short_side(image, size, interpolation)
    top, left = center_crop_offset(image.height, image.width, size)
    return image.crop((left, top, left + size, top + size))


def as_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (what the loader carries between the resize and the crop)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def unit(pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's `ToTensor()` of uint8 pixels: float32 in [0, 1]."""
    return pixels.to(torch.float32).div(255)


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    """`ToTensor()` then `Normalize([0.5], [0.5])`: float32 in [-1, 1], computed in the same order."""
    return unit(pixels).sub(0.5).div(0.5)


def crop_batch(images: list[torch.Tensor], size: int, *, center: bool, flips: torch.Tensor | None, generator,
               flip_before_crop: bool) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Crop each resized uint8 image to `size` x `size` (centre, or a random offset from `generator`) and mirror the
    rows `flips` marks; returns (uint8 batch (N, 3, size, size), each crop's (top, left) in the image it was taken
    from). `flip_before_crop`: the SDXL and SD3 examples mirror the resized image and crop it (and record the crop in
    the mirrored image); the SD 1.x/2.x ones crop, then mirror."""
    out, offsets = [], []
    for i, image in enumerate(images):
        flip = flips is not None and bool(flips[i])
        if flip and flip_before_crop:
            image = image.flip(-1)
        h, w = image.shape[-2:]
        top, left = center_crop_offset(h, w, size) if center else random_crop_offset(h, w, size, generator)
        image = image[:, top:top + size, left:left + size]
        if flip and not flip_before_crop:
            image = image.flip(-1)
        out.append(image)
        offsets.append((top, left))
    return torch.stack(out), offsets
