"""How images become latents: the VAE's downsampling factor, its posterior moments (stored in memory banks and
latent caches), and sampling a scaled latent from them exactly as `vae.encode(x).latent_dist.sample()` would."""

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def vae_scale_factor(vae_config) -> int:
    """How much the VAE downsamples (8 for Stable Diffusion's and DiT's): one halving per extra block. Takes the
    VAE's config (a dict or a FrozenDict), or the VAE."""
    config = getattr(vae_config, "config", vae_config)
    return 2 ** (len(config["block_out_channels"]) - 1)


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior parameters (mean and log-variance on the channel axis, diffusers' `latent_dist.parameters`,
    unscaled) of images in [-1, 1] and of their mirror images, as float32."""
    both = torch.cat([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
    moments = vae.encode(both).latent_dist.parameters.float()
    return moments.chunk(2)


def sample_latents(moments: torch.Tensor, generator, scaling_factor: float) -> torch.Tensor:
    """z ~ q(z|x) from stored moments, scaled as the diffusion model was trained."""
    return DiagonalGaussianDistribution(moments.float()).sample(generator) * scaling_factor


def as_uint8(images: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Pipeline output in [0, 1] as the uint8 pixels a PNG holds, and those pixels in [-1, 1] for the VAE."""
    images = (images * 255).round().astype(np.uint8)
    return images, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
