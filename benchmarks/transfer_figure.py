"""One picture of a transfer: the target data, the pre-trained model's samples and the fine-tuned model's samples,
one column per class, labelled, upscaled so that a person can see 16 px digits.

    python -m benchmarks.transfer_figure --data demo_out/digits --source demo_out/source \\
        --tuned demo_out/diff_tuning --output demo_out/transfer.png
"""

import argparse
import os

import numpy as np
import torch
from diffusers import DiTPipeline
from PIL import Image, ImageDraw

from utils.training import upscale

TILE = 56  # pixels per image in the figure
LABEL_WIDTH = 150


def class_samples(pipeline, class_ids, steps, seed):
    """One sample per class id with the same seeds for every pipeline (DDIM, CFG 1.5, as the paper samples)."""
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(class_labels=class_ids, guidance_scale=1.5, num_inference_steps=steps, output_type="np",
                      generator=[torch.Generator().manual_seed(seed + i) for i in range(len(class_ids))]).images
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]


def first_of_each_class(data_dir, names):
    return [Image.open(os.path.join(data_dir, name, sorted(os.listdir(os.path.join(data_dir, name)))[0]))
            .convert("RGB") for name in names]


def figure(rows: dict, names: list[str]) -> Image.Image:
    """rows: label -> one image per class. A header row of class names, then one labelled row per entry."""
    width, height = LABEL_WIDTH + TILE * len(names), 20 + TILE * len(rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((LABEL_WIDTH + j * TILE + 4, 4), name, fill="black")
    for i, (label, images) in enumerate(rows.items()):
        y = 20 + i * TILE
        draw.text((6, y + TILE // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            canvas.paste(upscale(image, TILE - 4).resize((TILE - 4, TILE - 4), Image.NEAREST),
                         (LABEL_WIDTH + j * TILE + 2, y + 2))
    return canvas


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="The target image folder (class sub-folders).")
    p.add_argument("--source", required=True, help="The pre-trained DiTPipeline.")
    p.add_argument("--tuned", required=True, help="The fine-tuned DiTPipeline.")
    p.add_argument("--output", required=True, help="PNG to write.")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps per sample.")
    p.add_argument("--seed", type=int, default=0, help="Sample seeds start here (the same for both models).")
    a = p.parse_args()
    tuned = DiTPipeline.from_pretrained(a.tuned)
    names = sorted(tuned.labels, key=tuned.labels.get)
    source = DiTPipeline.from_pretrained(a.source)
    # The source model's own label rows for the same names, when it knows them (MNIST -> digits: it does).
    source_ids = [source.labels[n] for n in names] if source.labels and set(names) <= set(source.labels) else None
    rows = {"target data": first_of_each_class(a.data, names)}
    if source_ids is not None:
        rows["pre-trained samples"] = class_samples(source, source_ids, a.steps, a.seed)
    rows["fine-tuned samples"] = class_samples(tuned, [tuned.labels[n] for n in names], a.steps, a.seed)
    figure(rows, names).save(a.output)
    print(f"transfer figure: {a.output}")


if __name__ == "__main__":
    main()
