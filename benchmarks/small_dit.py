"""Small class-conditional DiT pipelines built from configs, for tests, the demo and the benchmarks.

A DiTPipeline always decodes through its VAE, so a small DiT needs a small VAE: `train_vae` fits one briefly on
the source images and it then stays frozen, as the large models' VAE does.
"""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel


def build_pipeline(resolution=8, vae_channels=(8, 16), latent_channels=4, hidden=(2, 8), layers=2, patch=2,
                   learned_sigma=True, seed=0) -> DiTPipeline:
    """Random-weight DiTPipeline. num_embeds_ada_norm is 1000 so that class 1000 is the null class, as
    DiTPipeline's classifier-free guidance expects."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=min(vae_channels),
        sample_size=resolution,
    )
    heads, head_dim = hidden
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels,
        out_channels=2 * latent_channels if learned_sigma else latent_channels, num_layers=layers,
        sample_size=resolution // 2 ** (len(vae_channels) - 1), patch_size=patch, num_embeds_ada_norm=1000,
    )
    # DiT's noise schedule: 1000 linear betas from 1e-4 to 0.02.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
