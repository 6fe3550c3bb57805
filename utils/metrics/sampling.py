"""Sampling for evaluation with the papers' protocols: DDIM with a fixed step count for every family,
classifier-free guidance and balanced classes for class-conditional models, seeds per batch, so a model's FID is
reproducible and two models (or two merge weights) are compared on the same noise."""

import numpy as np
import torch
from tqdm.auto import tqdm


def seeded_generators(seeds, device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded with its own seed: an image is the same in any batch, on any process."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def balanced_classes(classes, start: int, count: int):
    """Class ids of images start .. start+count-1 when images cycle through the classes."""
    return [classes[i % len(classes)] for i in range(start, start + count)]


@torch.no_grad()
def generate(pipe, num_samples: int, batch_size: int, num_inference_steps: int, seed: int, device, classes=None,
             guidance_scale: float = 1.0, desc: str = "sampling", prompts=None, resolution: int | None = None,
             pipeline_kwargs: dict | None = None):
    """Yield NCHW float images in [0, 1], batch by batch (batch b seeded with seed + b), from a family's
    `evaluation_pipeline` (DDIM; text-to-image families their own sampler). With `classes` (a class-conditional
    pipeline) images cycle through them, with classifier-free guidance `guidance_scale`; with `prompts` (a
    text-to-image pipeline) image i is of prompt i mod P at `resolution`, with the pipeline's guidance."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for b, start in enumerate(tqdm(range(0, num_samples, batch_size), desc=desc)):
        n = min(batch_size, num_samples - start)
        generator = torch.Generator(device).manual_seed(seed + b)
        if prompts is not None:
            inputs = {"prompt": balanced_classes(prompts, start, n), "guidance_scale": guidance_scale,
                      "height": resolution, "width": resolution, **(pipeline_kwargs or {})}
        else:
            inputs = ({"class_labels": balanced_classes(classes, start, n), "guidance_scale": guidance_scale}
                      if classes is not None else {"batch_size": n})
        images = pipe(**inputs, num_inference_steps=num_inference_steps, generator=generator, output_type="np").images
        yield torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
