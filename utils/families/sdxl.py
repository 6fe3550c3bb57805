"""Stable Diffusion XL (`StableDiffusionXLPipeline`): two CLIP text encoders and the UNet's size-and-crop
conditioning, fed as diffusers' SDXL training scripts feed them (`train_text_to_image_lora_sdxl.py`).

- Text: each caption is tokenized by both tokenizers; the penultimate hidden states of both encoders are
  concatenated for cross-attention, and the second encoder's projected output is the pooled embedding.
- "text_time" added condition: the pooled embedding and six ids per image, (original height, width, crop top, crop
  left, target height, width), the crop taken in the resized image as diffusers' SDXL scripts record it (with
  `--random_flip` they mirror the resized image before cropping it, and record the crop in the mirrored image).
- The null condition (dropped captions, memory-bank rows with `bank_condition` "empty") is the empty prompt,
  encoded, as diffusers' SDXL training scripts drop captions; `force_zeros_for_empty_prompt` zeroes the negative
  prompt of classifier-free guidance at sampling only, and stays the pipeline's business.
- A VAE whose config asks for `force_upcast` (the stock SDXL VAE overflows in fp16) stays fp32 and encodes with
  autocast off, as diffusers' SDXL scripts keep it unless a fixed VAE (`--pretrained_vae_model_name_or_path`
  madebyollin/sdxl-vae-fp16-fix, no force_upcast) is given. Pipelines are built without the invisible watermark
  (bank images must not carry it).
"""

import functools

import torch
from diffusers import StableDiffusionXLPipeline

from ..diffusion.latents import vae_scale_factor
from ..infra.errors import UserError
from ..infra.training import freeze
from .base import Rows
from .ddpm import EPSILON_V_FLAGS, UNetFamily, unet_class
from .stable_diffusion import StableDiffusion, token_ids
from .tuning import lora_layers


class StableDiffusionXL(StableDiffusion):
    """Rows hold `input_ids` (N, 2, L): the caption's tokens of both tokenizers, and `time_ids` (N, 6)."""

    name, description, tag = "stable-diffusion-xl", "a Stable Diffusion XL pipeline", "stable-diffusion-xl"
    model_class, pipeline_class = "UNet2DConditionModel", "StableDiffusionXLPipeline"
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    example_call = 'pipe("a photo of a cat", num_inference_steps=30)'
    own_flags = {**EPSILON_V_FLAGS,
                 **{flag: "SDXL's size conditioning (the crop every row's size ids record)"
                    for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w")}}
    controlnet_pipeline = "StableDiffusionXLControlNetPipeline"
    controlnet_interpolation, flip_before_crop = "lanczos", True  # train_controlnet_sdxl.py's default; SDXL examples

    def __init__(self, pipeline, device, dtype=torch.float32, random_flip: bool = False, bank_condition: str = "empty",
                 train_text_encoder: bool = False, center_crop: bool = False,
                 image_interpolation_mode: str | None = None, crops_coords_top_left: tuple[int, int] | None = None):
        UNetFamily.__init__(self, pipeline, device, dtype, random_flip)
        self.set_preprocessing(center_crop, image_interpolation_mode)
        self.upcast_vae = bool(getattr(pipeline.vae.config, "force_upcast", False))
        self.vae = freeze(pipeline.vae, device, torch.float32 if self.upcast_vae else dtype)
        self.text_encoder = freeze(pipeline.text_encoder, device, dtype)  # a script may swap in prepared ones
        self.text_encoder_2 = freeze(pipeline.text_encoder_2, device, dtype)
        self.tokenizer, self.tokenizer_2 = pipeline.tokenizer, pipeline.tokenizer_2
        if self.tokenizer.model_max_length != self.tokenizer_2.model_max_length:
            raise UserError(f"the two SDXL tokenizers take {self.tokenizer.model_max_length} and "
                            f"{self.tokenizer_2.model_max_length} tokens; this adapter needs the same length")
        self.tokenize = functools.partial(token_ids, [self.tokenizer, self.tokenizer_2],
                                          [self.tokenizer.model_max_length] * 2, stack=True)
        self.bank_condition, self.train_text_encoder = bank_condition, train_text_encoder
        self.crops_coords_top_left = crops_coords_top_left  # fixed crop ids for every image (diffusers' flags)
        self.empty_ids = self.tokenize([""])

    @classmethod
    def matches(cls, index: dict) -> bool:
        return (unet_class(index) == "UNet2DConditionModel" and bool(index.get("text_encoder_2"))
                and index.get("_class_name") == "StableDiffusionXLPipeline")

    @classmethod
    def options(cls, args) -> dict:
        """Fixed crop ids for every row where --crops_coords_top_left_h/w are given (else each image's own crop)."""
        super().options(args)
        h, w = getattr(args, "crops_coords_top_left_h", None), getattr(args, "crops_coords_top_left_w", None)
        return {} if h is None and w is None else {"crops_coords_top_left": (h or 0, w or 0)}

    @staticmethod
    def load(name: str, revision=None, cache_dir=None, **kwargs):
        return StableDiffusionXLPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir, **kwargs)

    @staticmethod
    def sampler_from(pipeline, scheduler, unet=None, encoders: list | None = None):
        first, second = encoders or [pipeline.text_encoder, pipeline.text_encoder_2]
        parts = {**pipeline.components, "scheduler": scheduler, "unet": pipeline.unet if unet is None else unet,
                 "text_encoder": first, "text_encoder_2": second}
        return StableDiffusionXLPipeline(**parts,
                                         force_zeros_for_empty_prompt=pipeline.config.force_zeros_for_empty_prompt,
                                         add_watermarker=False)

    @staticmethod
    def controlnet_sampler(pipeline, controlnet, scheduler):
        from diffusers import StableDiffusionXLControlNetPipeline

        parts = {k: v for k, v in pipeline.components.items() if k not in ("image_encoder", "feature_extractor")}
        return StableDiffusionXLControlNetPipeline(
            **{**parts, "controlnet": controlnet, "scheduler": scheduler},
            force_zeros_for_empty_prompt=pipeline.config.force_zeros_for_empty_prompt, add_watermarker=False)

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder, self.text_encoder_2]

    def set_text_encoders(self, encoders: list) -> None:
        self.text_encoder, self.text_encoder_2 = encoders

    @staticmethod
    def save_lora(folder: str, unet, encoders: list | None) -> None:
        first, second = [lora_layers(e) for e in encoders] if encoders else (None, None)
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=lora_layers(unet),
                                                    text_encoder_lora_layers=first, text_encoder_2_lora_layers=second)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior moments (fp32 with autocast off where the VAE asks for `force_upcast`)."""
        with torch.autocast(pixels.device.type, enabled=not self.upcast_vae):
            return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters

    @staticmethod
    def time_ids(geometry: torch.Tensor, resolution: int) -> torch.Tensor:
        """(N, 6) from (N, 4) (original h, w, crop top, left) and the training resolution (the target size)."""
        target = torch.tensor([resolution, resolution], dtype=geometry.dtype).expand(len(geometry), 2)
        return torch.cat([geometry, target.to(geometry.device)], dim=1)

    def rows(self, batch, generator) -> Rows:
        """Each row's size ids: its original (height, width), the crop taken (top, left: in the mirrored image for
        a mirrored row, as the SDXL examples mirror before they crop) or the fixed --crops_coords_top_left_h/w, and
        the training resolution."""
        if "latent_moments" in batch:  # --cache_latents: the crop taken at caching, mirrored with the row
            moments, crops = self.cached_moments(batch, generator)
            size = moments.shape[-1] * vae_scale_factor(self.vae)
        else:
            pixels, offsets = self.pixels(batch, generator)
            moments, crops, size = self.encode_pixels(pixels).float(), torch.tensor(offsets), pixels.shape[-1]
        if self.crops_coords_top_left is not None:
            crops = torch.tensor([self.crops_coords_top_left]).expand(len(moments), 2)
        time_ids = self.time_ids(torch.cat([batch["original_size"].long(), crops.long()], dim=1), size)
        return Rows(moments, {"input_ids": batch["input_ids"].to(self.device), "time_ids": time_ids.to(self.device)})

    def bank_rows(self, batch, generator) -> Rows:
        moments = batch["latent_moments"].to(self.device)
        n, resolution = len(moments), moments.shape[-1] * vae_scale_factor(self.vae)
        ids = self.empty_ids.expand(n, -1, -1) if self.bank_condition == "empty" else batch["input_ids"]
        square = torch.tensor([[resolution, resolution, 0, 0]]).expand(n, 4)  # generated at the target size
        return Rows(moments, {"input_ids": ids.to(self.device), "time_ids": self.time_ids(square, resolution)
                              .to(self.device)})

    def null_condition(self, n: int, resolution: int | None = None) -> dict:
        """The empty prompt with the size ids of a square image at `resolution` (default: the UNet's), uncropped."""
        resolution = resolution or self.resolution
        square = torch.tensor([[resolution, resolution, 0, 0]]).expand(n, 4)
        return {**super().null_condition(n), "time_ids": self.time_ids(square, resolution).to(self.device)}

    def drop_condition(self, rows, mask) -> Rows:
        ids = torch.where(mask[:, None, None], self.empty_ids.to(self.device), rows.cond["input_ids"])
        return Rows(rows.x, {**rows.cond, "input_ids": ids})

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention states: both encoders' penultimate hidden states concatenated, pooled embedding: the
        second encoder's projection), as `StableDiffusionXLPipeline.encode_prompt` computes them."""
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second[0]

    def encode(self, cond):
        if self.train_text_encoder:  # encoded in `predict`, where gradients reach the encoders' adapters
            return cond
        hidden, pooled = self.embed(cond["input_ids"])
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": cond["time_ids"]}

    def predict(self, net, noisy, timesteps, cond):
        if "encoder_hidden_states" in cond:
            hidden, pooled = cond["encoder_hidden_states"], cond["text_embeds"]
        else:
            hidden, pooled = self.embed(cond["input_ids"])
        added = {"text_embeds": pooled, "time_ids": cond["time_ids"].to(hidden.dtype)}
        return net(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
