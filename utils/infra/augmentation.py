"""Training augmentation of image batches without torchvision (it does not import beside the pinned torch):
torchvision's RandomResizedCrop + RandomHorizontalFlip, drawn from a generator the caller passes, so a resumed
run makes exactly the random choices an uninterrupted one would.

Images arrive as uint8 (3, H, W) tensors of any size; crops are resized on the images' device with bilinear
antialiasing (torchvision's tensor path), then rescaled and normalised as the model's image processor does.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def crop_box(height: int, width: int, scale, ratio, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio in `ratio`
    (torchvision's `RandomResizedCrop.get_params`: ten tries, then the largest centred crop of a clamped ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=generator).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_views(images, size, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """One augmented view of each uint8 (3, H, W) image: a random resized crop to `size` (h, w) and a horizontal flip
    with probability 1/2. Returns float (N, 3, h, w) in 0..255 on the images' device."""
    views = []
    for image in images:
        top, left, h, w = crop_box(image.shape[-2], image.shape[-1], scale, ratio, generator)
        crop = image[None, :, top:top + h, left:left + w].float()
        view = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        if flip and torch.rand(1, generator=generator).item() < 0.5:
            view = view.flip(-1)
        views.append(view.clamp_(0, 255))
    return torch.stack(views)


def normalise(pixels: torch.Tensor, rescale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """0..255 pixels as the model's image processor feeds them (see utils.families.image_classifiers.normalisation)."""
    return (pixels * rescale - mean.to(pixels.device)) / std.to(pixels.device)


def as_uint8_tensor(image: Image.Image, max_short_side: int | None = None) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor. Images much larger than needed are first halved (box filter)
    while their short side stays at least `max_short_side`, which keeps crops of any scale sharper than the output."""
    image = image.convert("RGB")
    while max_short_side and min(image.size) >= 2 * max_short_side:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
