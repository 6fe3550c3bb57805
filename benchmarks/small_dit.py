"""Small class-conditional DiT pipelines built from configs, for tests, the demo and the benchmarks.

A DiTPipeline always decodes through its VAE, so a small DiT needs a small VAE: `train_vae` fits one briefly on
the source images and it then stays frozen, as the large models' VAE does.
"""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel


def build_pipeline(resolution=8, vae_channels=(8, 16), latent_channels=4, hidden=(2, 8), layers=2, patch=2,
                   learned_sigma=True, seed=0, vae_layers_per_block=1) -> DiTPipeline:
    """Random-weight DiTPipeline. num_embeds_ada_norm is 1000 so that class 1000 is the null class, as
    DiTPipeline's classifier-free guidance expects."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels, layers_per_block=vae_layers_per_block, norm_num_groups=min(32, *vae_channels),
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


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3, kl_weight=1e-4,
              seed: int = 0):
    """Fit the VAE briefly on images in [-1, 1] (reconstruction + a small KL), then set its scaling factor so
    latents have unit variance, as Stable Diffusion's 0.18215 does for its VAE."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae.train()
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(g)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return vae


def main():
    """Build and pre-train the small source model of the demo and the benchmarks (cached: skipped if done)."""
    import argparse
    import os
    import sys

    p = argparse.ArgumentParser(description="Pre-train a small class-conditional DiTPipeline on offline data.")
    p.add_argument("--output_dir", required=True, help="Where the pre-trained DiTPipeline goes.")
    p.add_argument("--source", default="mnist", help="Offline source data set (benchmarks.offline_data).")
    p.add_argument("--resolution", type=int, default=16, help="Image size.")
    p.add_argument("--vae_steps", type=int, default=400, help="VAE fitting steps (batch 32).")
    p.add_argument("--dit_steps", type=int, default=2000, help="DiT pre-training steps (batch 64).")
    p.add_argument("--seed", type=int, default=0, help="Seed.")
    a = p.parse_args()
    if os.path.exists(os.path.join(a.output_dir, "model_index.json")):
        print(f"{a.output_dir} exists: using the cached source model")
        return
    from PIL import Image

    from benchmarks.offline_data import SOURCES, write_image_folder
    from utils.data import to_tensor

    images, labels, names = SOURCES[a.source]()
    data_dir = write_image_folder(images, labels, names, a.output_dir + "-data")
    pixels = torch.stack([to_tensor(Image.fromarray(img), a.resolution) for img in images])
    pipe = build_pipeline(resolution=a.resolution, vae_channels=(16, 32), hidden=(2, 32), layers=4, seed=a.seed)
    train_vae(pipe.vae, pixels, a.vae_steps, seed=a.seed)
    pipe.save_pretrained(a.output_dir + "-init")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train_diff_tuning_dit as script

    script.main(script.parse_args([
        "--pretrained_model_name_or_path", a.output_dir + "-init", "--dataset", data_dir,
        "--output_dir", a.output_dir + ".tmp", "--method", "standard", "--resolution", str(a.resolution),
        "--train_batch_size", "64", "--learning_rate", "1e-3", "--max_train_steps", str(a.dit_steps),
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "100", "--cache_latents",
        "--no-random_flip",  # digits are not mirror-symmetric
        "--checkpointing_steps", "1000", "--validation_steps", "0", "--report_to", "none",
        "--validation_inference_steps", "25", "--seed", str(a.seed)]))
    os.replace(a.output_dir + ".tmp", a.output_dir)


if __name__ == "__main__":
    main()
