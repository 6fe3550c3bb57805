"""torchvision.transforms as train_text_to_image_lora.py uses it, on PIL images, with torchvision's rules
(utils.infra.image_transforms, tested against them) and torch's global generator, as torchvision draws."""

import enum

import torch

from utils.infra import image_transforms as ops


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, f):
        self.f = f

    def __call__(self, x):
        return self.f(x)


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.mode = size, interpolation.value

    def __call__(self, image):
        return ops.resize_short_side(image, self.size, self.mode)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        top, left = ops.center_crop_offset(image.height, image.width, self.size)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop:
    def __init__(self, size):
        self.size = size

    @staticmethod
    def get_params(image, output_size):
        h, w = output_size
        if image.height == h and image.width == w:
            return 0, 0, h, w
        top = torch.randint(0, image.height - h + 1, size=(1,)).item()
        left = torch.randint(0, image.width - w + 1, size=(1,)).item()
        return top, left, h, w

    def __call__(self, image):
        top, left, h, w = self.get_params(image, (self.size, self.size))
        return image.crop((left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        from PIL import Image

        return image.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else image


class ToTensor:
    def __call__(self, image):
        return ops.unit(ops.as_uint8_tensor(image))


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, x):
        return x.sub(self.mean).div(self.std)
