"""Sampling for evaluation with the papers' protocols: DDIM with a fixed step count for every kind, classifier-free
guidance and classes balanced for DiT, seeds per batch, so a model's FID is reproducible and two models (or two
merge weights) are compared on the same noise."""

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline
from tqdm.auto import tqdm


def seeded_generators(seeds, device="cpu") -> list[torch.Generator]:
    """One generator per image, seeded with its own seed: an image is the same in any batch, on any process."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def balanced_classes(classes, start: int, count: int):
    """Class ids of images start .. start+count-1 when images cycle through the classes."""
    return [classes[i % len(classes)] for i in range(start, start + count)]


@torch.no_grad()
def generate(kind: str, denoiser, parts: dict, num_samples: int, batch_size: int, num_inference_steps: int,
             guidance_scale: float, seed: int, device, desc: str = "sampling"):
    """Yield NCHW float images in [0, 1], batch by batch (batch b seeded with seed + b). kind "dit": `parts` holds
    the VAE, the scheduler and the class ids; "ddpm": the scheduler. The denoiser is what the pipeline calls."""
    scheduler = DDIMScheduler.from_config(parts["scheduler"].config)
    if kind == "dit":
        pipe = DiTPipeline(transformer=denoiser, vae=parts["vae"], scheduler=scheduler)
    else:
        pipe = DDIMPipeline(unet=denoiser, scheduler=scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for b, start in enumerate(tqdm(range(0, num_samples, batch_size), desc=desc)):
        n = min(batch_size, num_samples - start)
        generator = torch.Generator(device).manual_seed(seed + b)
        if kind == "dit":
            images = pipe(class_labels=balanced_classes(parts["classes"], start, n), guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, generator=generator, output_type="np").images
        else:
            images = pipe(batch_size=n, num_inference_steps=num_inference_steps, generator=generator,
                          output_type="np").images
        yield torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
