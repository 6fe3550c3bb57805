"""Small UNet pipelines built from configs, for the DeMe tests and benchmarks: an unconditional pixel-space DDPM
(`UNet2DModel`) and a text-to-image Stable Diffusion pipeline (`UNet2DConditionModel`, VAE, CLIP text encoder and a
character-level CLIP tokenizer written to a folder, since transformers 5 builds CLIPTokenizer only from one)."""

import json
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def build_ddpm_pipeline(resolution=8, channels=(8, 16), seed=0) -> DDPMPipeline:
    """Random-weight DDPMPipeline with the DDPM CIFAR-10 noise schedule (1000 linear betas, 1e-4 to 0.02)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("AttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        norm_num_groups=min(channels) // 2, attention_head_dim=4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


def tiny_clip_tokenizer(folder: str, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (no merges), saved to and loaded from `folder`."""
    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def build_sd_pipeline(folder: str, resolution=16, seed=0, max_length=16,
                      unet_channels=(8, 16)) -> StableDiffusionPipeline:
    """Random-weight StableDiffusionPipeline (no safety checker); `folder` receives the tokenizer files. The tokenizer
    has one token per character: `max_length` 16 truncates "a handwritten digit 3", 32 does not."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(os.path.join(folder, "tokenizer-src"), max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
