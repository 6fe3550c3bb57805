"""UNet diffusion pipelines as DeMe trains, evaluates and merges them: an unconditional pixel-space DDPM/DDIM
pipeline (`UNet2DModel`) or Stable Diffusion (`UNet2DConditionModel` with a frozen VAE and CLIP text encoder).

`UNetDenoising` turns dataset rows into the UNet's inputs (pixels or VAE latents, text embeddings) and gives the
prediction and its target for either kind, so training and the merge-weight search compute the same loss."""

import os

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline

from .data import to_tensor
from .errors import UserError
from .latents import sample_latents, vae_scale_factor
from .training import freeze

KINDS = {"UNet2DModel": "ddpm", "UNet2DConditionModel": "sd"}


def unet_pipeline_kind(name: str, revision=None, cache_dir=None) -> str:
    """"ddpm" for a pipeline with a UNet2DModel (DDPM/DDIM), "sd" for Stable Diffusion; read from
    model_index.json alone, before any weights load."""
    try:
        index = DiffusionPipeline.load_config(name, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a diffusers pipeline from {name!r}: {str(e).strip().splitlines()[0]}") from e
    unet_class = (index.get("unet") or [None, None])[1]
    if unet_class not in KINDS:
        raise UserError(f"{name} is a {index.get('_class_name')} whose unet is {unet_class}; DeMe needs a pipeline "
                        f"with a UNet2DModel (DDPM/DDIM) or a UNet2DConditionModel (Stable Diffusion)")
    return KINDS[unet_class]


def load_unet_pipeline(name: str, kind: str, revision=None, cache_dir=None):
    if kind == "sd":  # no safety checker: it is not used in training and would cost memory
        return StableDiffusionPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir,
                                                       safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir)


def unet_weights_folder(path: str) -> str:
    """The folder holding a UNet's config and weights: `path/unet` for a pipeline folder, else `path`."""
    return os.path.join(path, "unet") if os.path.exists(os.path.join(path, "model_index.json")) else path


class UNetDenoising:
    """What the loss needs to know about a pipeline: how rows become x_0 and conditioning, and the target."""

    def __init__(self, pipeline, kind: str, device, dtype=torch.float32):
        self.kind = kind
        self.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        self.vae = self.text_encoder = self.tokenizer = None
        if kind == "sd":
            self.vae = freeze(pipeline.vae, device, dtype)
            self.text_encoder = freeze(pipeline.text_encoder, device, dtype)
            self.tokenizer = pipeline.tokenizer
        self.device = device
        vae_scale = vae_scale_factor(self.vae) if self.vae is not None else 1
        self.resolution = pipeline.unet.config.sample_size * vae_scale  # the size the model was trained at

    def transform(self, image_column: str, caption_column: str | None, resolution: int):
        """A `Dataset.with_transform` function: `pixel_values` in [-1, 1] (and `input_ids` for Stable Diffusion).
        Flips happen in the training loop with the run's own generator, so a resumed run repeats them exactly."""

        def transform(batch):
            out = {"pixel_values": [to_tensor(img, resolution) for img in batch[image_column]]}
            if self.tokenizer is not None:
                captions = [c[0] if isinstance(c, (list, tuple)) else c for c in batch[caption_column]]
                out["input_ids"] = self.tokenizer(captions, padding="max_length", truncation=True,
                                                  max_length=self.tokenizer.model_max_length,
                                                  return_tensors="pt").input_ids
            return out

        return transform

    @torch.no_grad()
    def inputs(self, batch, generator=None, flip=None):
        """(x_0, conditioning) of a batch: pixels (DDPM) or scaled VAE latents (SD), and text embeddings or None."""
        pixels = batch["pixel_values"].to(self.device)
        if flip is not None:
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        if self.vae is None:
            return pixels, None
        moments = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters
        latents = sample_latents(moments, generator, self.vae.config.scaling_factor)
        cond = self.text_encoder(batch["input_ids"].to(self.device))[0]
        return latents, cond

    @staticmethod
    def predict(unet, noisy, timesteps, cond):
        if cond is None:
            return unet(noisy, timesteps).sample
        return unet(noisy, timesteps, encoder_hidden_states=cond).sample

    def target(self, x0, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0  # "sample"

    @torch.no_grad()
    def range_losses(self, unet, batches, ranges, seed: int = 0) -> list[float]:
        """Held-out denoising loss of `unet` on each timestep range. The noise and timesteps depend only on `seed`,
        the batch and the range, so two models scored with the same seed see exactly the same problems."""
        losses = []
        for r, (lo, hi) in enumerate(ranges):
            total, count = 0.0, 0
            for b, batch in enumerate(batches):
                g = torch.Generator(self.device).manual_seed(hash((seed, r, b)) & (2**63 - 1))
                x0, cond = self.inputs(batch, g)
                t = torch.randint(lo, hi, (len(x0),), generator=g, device=self.device)
                noise = torch.randn(x0.shape, generator=g, device=self.device)
                noisy = self.scheduler.add_noise(x0, noise, t)
                pred = self.predict(unet, noisy, t, cond)
                total += (pred.float() - self.target(x0, noise, t).float()).pow(2).mean().item() * len(x0)
                count += len(x0)
            losses.append(total / count)
        return losses

    def sampling_pipeline(self, pipeline, unet):
        """A pipeline that samples with `unet` and DDIM (the papers' 50-step protocol for DDPM) or the
        pipeline's own scheduler (PNDM for Stable Diffusion)."""
        if self.kind == "sd":
            pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                           unet=unet, scheduler=pipeline.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        else:
            pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, pipeline, unet, num_images: int, num_inference_steps: int, seed: int, prompts=None):
        """NHWC images in [0, 1]."""
        pipe = self.sampling_pipeline(pipeline, unet)
        generator = torch.Generator(self.device).manual_seed(seed)
        if self.kind == "sd":
            prompts = [prompts[i % len(prompts)] for i in range(num_images)]
            return pipe(prompts, num_inference_steps=num_inference_steps, generator=generator, output_type="np",
                        height=self.resolution, width=self.resolution).images
        return pipe(batch_size=num_images, num_inference_steps=num_inference_steps, generator=generator,
                    output_type="np").images
