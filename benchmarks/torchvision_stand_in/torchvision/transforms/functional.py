"""torchvision.transforms.functional.crop on a PIL image, as the SDXL examples call it."""


def crop(image, top: int, left: int, height: int, width: int):
    return image.crop((left, top, left + width, top + height))
