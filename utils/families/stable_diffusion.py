"""Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`: `UNet2DConditionModel` with a frozen VAE and CLIP text
encoder; epsilon or v prediction), the base of the SDXL and SD3 families: how captioned rows and memory-bank rows
are fed, its memory-bank sampler (prompted samples of the pre-trained pipeline) and the bank's view for the loader."""

import functools
import os

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageOps

from ..diffusion.latents import as_uint8, encode_moments, sample_latents, vae_scale_factor
from ..infra.data import ArrowBatches, as_batch
from ..infra.errors import UserError
from ..infra.image_transforms import (
    as_uint8_tensor,
    crop_batch,
    normalized,
    resize_center_crop,
    resize_short_side,
)
from ..infra.training import freeze
from ..metrics.sampling import seeded_generators
from .base import BankPlan, BankSettings, Rows
from .ddpm import EPSILON_V_FLAGS, UNetFamily, unet_class
from .tuning import UNET_LORA_TARGETS, lora_layers

CONDITIONING_CHANNELS = (16, 32, 96, 256)  # ControlNetModel.from_unet's conditioning embedding (an 8x VAE's)


def token_ids(tokenizers, lengths, captions: list[str], stack: bool = False) -> torch.Tensor:
    """Each tokenizer's ids of `captions`, padded or cut to its length, side by side (N, sum of lengths) or, with
    `stack`, stacked (N, k, L). A function of the tokenizers alone: a dataset transform built on a partial of it is
    hashed by `datasets` without the models (text encoders a pipeline has run do not pickle)."""
    ids = [tok(captions, padding="max_length", truncation=True, max_length=n, return_tensors="pt").input_ids
           for tok, n in zip(tokenizers, lengths)]
    return torch.stack(ids, dim=1) if stack else torch.cat(ids, dim=1)



class StableDiffusion(UNetFamily):
    """Text-conditioned: rows also hold `input_ids` (the first caption of a list), encoded by the CLIP text encoder
    (frozen, or with LoRA adapters when `train_text_encoder`: then encoded inside the loss, with gradients); latents
    are sampled from the frozen VAE's posterior. Memory-bank rows hold stored `latent_moments` and are conditioned
    on the empty prompt (`bank_condition` "empty", Diff-Tuning's null condition) or on their own prompt ("prompt",
    DreamBooth's prior preservation); a dropped caption becomes the empty prompt."""

    name, description, tag = "stable-diffusion", "a Stable Diffusion 1.x/2.x pipeline", "stable-diffusion"
    model_class, pipeline_class, model_key = "UNet2DConditionModel", "StableDiffusionPipeline", "unet"
    denoiser_class, scheduler_class = UNet2DConditionModel, DDPMScheduler  # the trained model; the training noise
    lora_targets = UNET_LORA_TARGETS
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers")  # card tags the Hub filters on (diffusers')
    example_call = 'pipe("a photo of a cat", num_inference_steps=50)'
    needs_captions = True
    pipeline_kwargs: dict = {}  # more arguments of every pipeline call (SD3: max_sequence_length)
    own_flags = {**EPSILON_V_FLAGS, "tokenizer_name": "the one tokenizer of a Stable Diffusion 1.x/2.x pipeline"}
    bank_guidance_scale = validation_guidance_scale = 7.5  # CFG scale of memory-bank and validation samples
    controlnet_pipeline = "StableDiffusionControlNetPipeline"  # None: no ControlNet trains on this family
    # diffusers' examples' preprocessing (utils.infra.image_transforms): their default --image_interpolation_mode
    # for text-to-image and DreamBooth, and for ControlNet; whether they mirror before the crop
    image_interpolation, controlnet_interpolation, flip_before_crop = "lanczos", "bilinear", False

    def __init__(self, pipeline, device, dtype=torch.float32, random_flip: bool = False, bank_condition: str = "empty",
                 train_text_encoder: bool = False, center_crop: bool = False,
                 image_interpolation_mode: str | None = None):
        super().__init__(pipeline, device, dtype, random_flip)
        self.set_preprocessing(center_crop, image_interpolation_mode)
        self.vae = freeze(pipeline.vae, device, dtype)
        self.text_encoder = freeze(pipeline.text_encoder, device, dtype)  # a script may swap in a prepared one
        self.tokenizer = pipeline.tokenizer
        self.tokenize = functools.partial(token_ids, [self.tokenizer], [self.tokenizer.model_max_length])
        self.bank_condition, self.train_text_encoder = bank_condition, train_text_encoder
        self.empty_ids = self.tokenize([""])

    @classmethod
    def matches(cls, index: dict) -> bool:
        return (unet_class(index) == "UNet2DConditionModel" and "text_encoder" in index
                and not index.get("text_encoder_2") and "XL" not in index.get("_class_name", ""))

    @classmethod
    def check_resolution(cls, name, resolution, revision=None, cache_dir=None) -> int:
        """A multiple of the VAE's factor (x the transformer's patch size where latents are patched: SD3); default:
        the UNet's (transformer's) sample size x the VAE factor (512 for SD 1.5, 1024 for SDXL and SD3)."""
        factor, config = cls.latent_configs(name, revision, cache_dir)
        resolution = resolution or config["sample_size"] * factor
        patch = config.get("patch_size") or 1  # a UNet takes latents as they are; SD3's transformer 2x2 patches
        if resolution % (factor * patch):
            why = f"the VAE's factor {factor}" if patch == 1 else \
                f"{factor * patch} (the VAE's factor {factor} x the transformer's patch size {patch})"
            raise UserError(f"--resolution {resolution} is not a multiple of {why}")
        return resolution

    @classmethod
    def sampling_kwargs(cls, options: dict) -> dict:
        """The pipeline-call arguments its options fix (SD3: the T5 length), recorded by a bank."""
        return {}

    @classmethod
    def guided_passes(cls, guidance_scale: float) -> bool:
        """Whether sampling at `guidance_scale` runs the denoiser twice a step (classifier-free guidance above 1;
        Flux's guidance is an embedding: `Flux`)."""
        return guidance_scale > 1

    @classmethod
    def bank_plan(cls, name, settings: BankSettings, options: dict) -> BankPlan:
        """Sample i from prompt i mod P at CFG 7.5 (default) and the training resolution; a bank records the
        resolution, the prompts, what the pipeline call was given (SD3: the T5 length), another VAE and a DreamBooth
        folder's class images (`settings.class_images`: rows 0..n-1)."""
        kwargs = cls.sampling_kwargs(options)
        cls.check_resolution(name, settings.resolution, settings.revision, settings.cache_dir)
        record = {"family": cls.name, "base_model": name, "resolution": settings.resolution,
                  "prompts": settings.prompts, **kwargs}
        if settings.vae:  # a bank's latents are its VAE's
            record["vae"] = settings.vae
        if settings.class_images:  # DreamBooth's folder: which images rows 0..n-1 are
            record["class_images"] = [os.path.abspath(f) for f in settings.class_images]
        guidance = cls.bank_guidance(settings)
        return BankPlan(record, lambda pipe: PromptBankSampler(pipe, settings.prompts, guidance,
                                                               settings.num_inference_steps, settings.resolution,
                                                               cls, kwargs, settings.class_images))

    def bank_view(self, bank) -> tuple:
        """Stored moments and each row's prompt tokens."""
        return PromptBankRows(bank, self.tokenize), as_batch

    def null_condition(self, n: int, resolution: int | None = None) -> dict:
        return {"input_ids": self.empty_ids.expand(n, *self.empty_ids.shape[1:])}

    @staticmethod
    def sampling_scheduler(pipeline):
        """The sampler of validation grids and memory banks: DDIM on the pipeline's noise schedule, with
        clip_sample off where the config does not set it (Stable Diffusion pipelines turn it off anyway, after a
        22-line deprecation warning that this spares every run)."""
        config = pipeline.scheduler.config
        return DDIMScheduler.from_config(config, **({} if "clip_sample" in config else {"clip_sample": False}))

    @staticmethod
    def sampler_from(pipeline, scheduler, unet=None, encoders: list | None = None):
        """`pipeline`'s models with another scheduler, and another `unet` and text `encoders` where given (no
        safety checker)."""
        return StableDiffusionPipeline(vae=pipeline.vae, text_encoder=(encoders or [pipeline.text_encoder])[0],
                                       tokenizer=pipeline.tokenizer, unet=pipeline.unet if unet is None else unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    # ---- ControlNets on this family (utils.families.controlnet feeds them; train_diff_tuning_controlnet.py trains)
    controlnet_class_name = "ControlNetModel"
    controlnet_image_arg = "image"  # the ControlNet pipeline's argument for the control

    @classmethod
    def controlnet_class(cls):
        import diffusers

        return getattr(diffusers, cls.controlnet_class_name)

    @classmethod
    def check_controlnet_config(cls, control: dict, denoiser: dict) -> str | None:
        """Why a ControlNet's config cannot follow this denoiser's (None: it can)."""
        for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
            if list(np.atleast_1d(control.get(key))) != list(np.atleast_1d(denoiser.get(key))):
                return f"{key} {control.get(key)} vs {denoiser.get(key)}"
        return None

    @classmethod
    def controlnet_refusal(cls, denoiser: dict) -> str | None:
        """Why no new ControlNet can be copied from this denoiser's config (None: one can)."""
        return None

    def new_controlnet(self):
        """A ControlNet copied from the UNet's encoder, as diffusers' train_controlnet.py makes one; its conditioning
        embedding takes the first log2(f) + 1 of (16, 32, 96, 256), the widths of an 8x VAE's three stride-2 convs,
        for a VAE of factor f."""
        channels = CONDITIONING_CHANNELS[: int(np.log2(vae_scale_factor(self.vae))) + 1]
        return self.controlnet_class().from_unet(self.denoiser, conditioning_embedding_out_channels=channels)

    def control_input(self, controls: torch.Tensor, generator) -> torch.Tensor:
        """What the ControlNet is given for controls in [0, 1]: the pixels themselves (train_controlnet.py)."""
        return controls

    def controlnet_predict(self, controlnet, denoiser, noisy, timesteps, cond, dtype):
        """The frozen UNet's prediction with the ControlNet's residuals added (the ControlNet runs in its own
        precision, the UNet in `dtype`)."""
        hidden = cond["encoder_hidden_states"]
        added = {}
        if "text_embeds" in cond:  # SDXL: pooled embedding and size ids, to the ControlNet and the UNet
            added = {"added_cond_kwargs": {"text_embeds": cond["text_embeds"],
                                           "time_ids": cond["time_ids"].to(hidden.dtype)}}
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden,
                               controlnet_cond=cond["controls"].to(dtype), return_dict=False, **added)
        return denoiser(noisy.to(dtype), timesteps, encoder_hidden_states=hidden,
                        down_block_additional_residuals=[d.to(dtype) for d in down],
                        mid_block_additional_residual=mid.to(dtype), return_dict=False, **added)[0]

    @staticmethod
    def controlnet_sampler(pipeline, controlnet, scheduler):
        """`pipeline`'s models with a ControlNet and another scheduler (no safety checker)."""
        from diffusers import StableDiffusionControlNetPipeline

        return StableDiffusionControlNetPipeline(
            vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=pipeline.unet,
            controlnet=controlnet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    @staticmethod
    def load(name: str, revision=None, cache_dir=None, **kwargs):
        # no safety checker: it is not used in training and would cost memory
        return StableDiffusionPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir,
                                                       safety_checker=None, requires_safety_checker=False, **kwargs)

    @property
    def denoiser(self):
        """The pipeline's UNet (SD3: transformer)."""
        return getattr(self.pipeline, self.model_key)

    @property
    def resolution(self) -> int:
        return self.pipeline.unet.config.sample_size * vae_scale_factor(self.vae)

    @classmethod
    def evaluation_pipeline(cls, unet, parts: dict):
        """evaluate_fid.py's sampler: the pipeline (`parts["pipeline"]`) with `unet` and its validation sampler
        (DDIM; SD3 and Flux their flow-matching Euler scheduler)."""
        pipeline = parts["pipeline"]
        return cls.sampler_from(pipeline, cls.sampling_scheduler(pipeline), unet)

    @staticmethod
    def image_size(unet, parts: dict) -> int:
        return parts["resolution"]

    @classmethod
    def from_pipeline(cls, pipeline, device, **options) -> "StableDiffusion":
        """For commands that evaluate rather than train: no flips, centre crops."""
        return cls(pipeline, device, **{"center_crop": True, **options})

    def set_preprocessing(self, center_crop: bool, image_interpolation_mode: str | None) -> None:
        """The examples' crop (random, or centre with --center_crop) and resize filter (the family's default)."""
        self.center_crop = center_crop
        self.interpolation = image_interpolation_mode or self.image_interpolation

    def transform(self, image_column, caption_column, resolution):
        """A `Dataset.with_transform` function: each image resized as the examples resize it (short side to
        `resolution`; uint8, its own aspect), its original (height, width) and the caption's tokens. The crop and the
        flip happen in `rows`, drawn from the run's generator."""
        tokenize, interpolation = self.tokenize, self.interpolation  # not the family: datasets hashes the transform

        def transform(batch):
            images = [img.convert("RGB") for img in batch[image_column]]
            captions = [c[0] if isinstance(c, (list, tuple)) else c for c in batch[caption_column]]
            return {"pixel_values": [as_uint8_tensor(resize_short_side(img, resolution, interpolation))
                                     for img in images],
                    "original_size": [torch.tensor([img.height, img.width]) for img in images],
                    "input_ids": tokenize(captions)}

        return transform

    @staticmethod
    def collate(rows: list[dict]) -> dict:
        """The loader's collate_fn: resized images of their own sizes as a list, the rest stacked (cached rows:
        everything stacked)."""
        batch = torch.utils.data.default_collate([{k: v for k, v in r.items() if k != "pixel_values"} for r in rows])
        return {**batch, "pixel_values": [r["pixel_values"] for r in rows]} if "pixel_values" in rows[0] else batch

    def cache_latents(self, ds, image_column: str, caption_column: str, resolution: int, seed: int, key: list):
        """--cache_latents (diffusers' flag): `ds` as rows of VAE posterior moments, computed once before training
        and cached by `datasets`. Each image is resized as `transform` resizes it and cropped once, as the examples'
        DreamBooth datasets crop once: the centre with --center_crop, else an offset drawn from (`seed`, row). Its
        mirror is encoded too, so --random_flip still draws a flip every step. SDXL's size ids record the crop
        (`crop`, and `crop_mirrored` for the mirrored row)."""
        transform, center, flip_first = self.transform(image_column, caption_column, resolution), self.center_crop, \
            self.flip_before_crop
        encode = self.encode_pixels

        def encode_batch(batch, indices):
            rows = transform(batch)
            crops, tops, lefts, mirrored = [], [], [], []
            for image, i in zip(rows["pixel_values"], indices):
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                cropped, [(top, left)] = crop_batch([image], resolution, center=center, flips=None, generator=g,
                                                    flip_before_crop=flip_first)
                crops.append(cropped[0])
                tops.append(top)
                lefts.append(left)
                # the mirrored row: SD 1.x mirrors the crop; SDXL/SD3 crop the mirrored image, at the mirrored offset
                mirrored.append(image.shape[-1] - resolution - left if flip_first else left)
            pixels = normalized(torch.stack(crops)).to(self.device)
            with torch.no_grad():
                moments, flipped = encode(pixels).float(), encode(pixels.flip(-1)).float()
            return {"latent_moments": moments.cpu().numpy(), "latent_moments_flipped": flipped.cpu().numpy(),
                    "input_ids": rows["input_ids"].numpy(), "original_size": torch.stack(rows["original_size"]).numpy(),
                    "crop": np.array([tops, lefts]).T, "crop_mirrored": np.array([tops, mirrored]).T}

        shape = (2 * self.vae.config.latent_channels, resolution // vae_scale_factor(self.vae),
                 resolution // vae_scale_factor(self.vae))
        ids = self.empty_ids.shape[1:]
        cached = ds.map(
            encode_batch, with_indices=True, batched=True, batch_size=16, remove_columns=ds.column_names,
            features=datasets.Features({
                "latent_moments": datasets.Array3D(shape, "float32"),
                "latent_moments_flipped": datasets.Array3D(shape, "float32"),
                "input_ids": (datasets.Array2D(tuple(ids), "int64") if len(ids) == 2
                              else datasets.Sequence(datasets.Value("int64"), length=ids[0])),
                "original_size": datasets.Sequence(datasets.Value("int64"), length=2),
                "crop": datasets.Sequence(datasets.Value("int64"), length=2),
                "crop_mirrored": datasets.Sequence(datasets.Value("int64"), length=2)}),
            new_fingerprint=Hasher.hash([ds._fingerprint, *key, dict(self.vae.config), resolution, center, seed,
                                         self.interpolation, str(self.vae.dtype), type(self).__name__]),
            desc="caching latents")
        return cached.with_format("torch")

    def cached_moments(self, batch, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows: each row's moments (its mirror's where a flip is drawn) and the crop they record."""
        flips = self.flips(len(batch["latent_moments"]), generator)
        if flips is None:
            return batch["latent_moments"].to(self.device), batch["crop"]
        flips = flips.to(batch["latent_moments"].device)
        return (torch.where(flips[:, None, None, None], batch["latent_moments_flipped"], batch["latent_moments"])
                .to(self.device), torch.where(flips[:, None], batch["crop_mirrored"], batch["crop"]))

    def pixels(self, batch, generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The batch's images cropped (centre, or at offsets drawn from `generator` after the flips) and mirrored as
        the examples do, in [-1, 1] on the device; and each crop's (top, left)."""
        images = batch["pixel_values"]
        flips = self.flips(len(images), generator)
        size = min(images[0].shape[-2:])
        cropped, offsets = crop_batch(images, size, center=self.center_crop, flips=flips, generator=generator,
                                      flip_before_crop=self.flip_before_crop)
        return normalized(cropped).to(self.device), offsets

    def rows(self, batch, generator) -> Rows:
        if "latent_moments" in batch:  # --cache_latents
            return Rows(self.cached_moments(batch, generator)[0], {"input_ids": batch["input_ids"].to(self.device)})
        pixels, _ = self.pixels(batch, generator)
        return Rows(self.encode_pixels(pixels), {"input_ids": batch["input_ids"].to(self.device)})

    def bank_rows(self, batch, generator) -> Rows:
        n = len(batch["latent_moments"])
        ids = self.empty_ids.expand(n, -1) if self.bank_condition == "empty" else batch["input_ids"]
        return Rows(batch["latent_moments"].to(self.device), {"input_ids": ids.to(self.device)})

    def drop_condition(self, rows, mask) -> Rows:
        ids = torch.where(mask[:, None], self.empty_ids.to(self.device), rows.cond["input_ids"])
        return Rows(rows.x, {**rows.cond, "input_ids": ids})

    def x0(self, x, generator):
        return sample_latents(x, generator, self.vae.config.scaling_factor)

    def encode(self, cond):
        if self.train_text_encoder:  # encoded in `predict`, where gradients reach the text encoder's adapters
            return cond
        return {"encoder_hidden_states": self.text_encoder(cond["input_ids"])[0]}

    def predict(self, net, noisy, timesteps, cond):
        hidden = cond["encoder_hidden_states"] if "encoder_hidden_states" in cond else \
            self.text_encoder(cond["input_ids"])[0]
        return net(noisy, timesteps, encoder_hidden_states=hidden).sample

    @property
    def text_encoders(self) -> list:
        """The text encoders a script may give LoRA adapters (and swap for prepared ones: `set_text_encoders`)."""
        return [self.text_encoder]

    def set_text_encoders(self, encoders: list) -> None:
        (self.text_encoder,) = encoders

    def inference_pipeline(self, unet, encoders: list, scheduler):
        """A pipeline of this family around `unet` and `encoders` (the frozen VAE and tokenizers), for validation and
        memory-bank samples."""
        return self.sampler_from(self.pipeline, scheduler, unet, encoders)

    @staticmethod
    def save_lora(folder: str, unet, encoders: list | None) -> None:
        """diffusers' LoRA files (`load_lora_weights` reads them): the UNet's adapters, and the text encoder's if
        trained (`encoders`, else None)."""
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_layers(unet),
                                                  text_encoder_lora_layers=lora_layers(encoders[0]) if encoders
                                                  else None)

    def sampling_pipeline(self, unet):
        """The pipeline's own scheduler (PNDM for Stable Diffusion), as DeMe evaluates it."""
        pipe = self.inference_pipeline(unet, self.text_encoders, self.pipeline.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, unet, num_images, num_inference_steps, seed, prompts=None, resolution=None):
        """NHWC images in [0, 1] of prompt i mod P, at `resolution` (default: the model's own)."""
        generator = torch.Generator(self.device).manual_seed(seed)
        prompts = [prompts[i % len(prompts)] for i in range(num_images)]
        size = resolution or self.resolution
        return self.sampling_pipeline(unet)(prompts, num_inference_steps=num_inference_steps, generator=generator,
                                            output_type="np", height=size, width=size,
                                            **self.pipeline_kwargs).images


class PromptBankSampler:
    """Bank rows of a text-to-image pipeline (Stable Diffusion, or SDXL with `family` its family class): sample i is
    generated from prompt i mod P (so a bank does not depend on the batch size) with DDIM and classifier-free
    guidance. `sampler(seeds)` -> the columns of those rows: the generated `image`, its `text` prompt and `seed`,
    and `latent_moments` (the VAE posterior). With `class_images` (DreamBooth's folder of class images), rows
    0..n-1 are those images instead, resized and centre-cropped to the resolution as the family's examples
    preprocess them, and only the rest is generated (DreamBooth's top-up to --num_class_images)."""

    family = StableDiffusion.name

    def __init__(self, pipeline, prompts: list[str], guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 resolution: int = 512, family: type[StableDiffusion] = StableDiffusion,
                 pipeline_kwargs: dict | None = None, class_images: tuple[str, ...] = ()):
        self.pipeline, self.prompts, self.resolution = pipeline, list(prompts), resolution
        self.class_images, self.interpolation = list(class_images), family.image_interpolation
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self.family, self.pipeline_kwargs = family.name, dict(pipeline_kwargs or {})
        self.sampler = family.sampler_from(pipeline, family.sampling_scheduler(pipeline))
        self.sampler.set_progress_bar_config(disable=True)
        factor = vae_scale_factor(pipeline.vae)
        self.latent_shape = (2 * pipeline.vae.config.latent_channels, resolution // factor, resolution // factor)
        self.model = getattr(pipeline, family.model_key)
        self.settings = {"prompts": self.prompts, "guidance_scale": guidance_scale,
                         "num_inference_steps": num_inference_steps, "resolution": resolution, **self.pipeline_kwargs}

    @property
    def features(self) -> datasets.Features:
        return datasets.Features({
            "image": datasets.Image(), "text": datasets.Value("string"), "seed": datasets.Value("int64"),
            "latent_moments": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
        })

    def generate(self, seeds: list[int]) -> tuple[list[str], np.ndarray, torch.Tensor]:
        """(prompts, uint8 images, VAE posterior moments) of these seeds (a user's class image for seed i < n)."""
        prompts = [self.prompts[s % len(self.prompts)] for s in seeds]
        drawn = [i for i, s in enumerate(seeds) if s >= len(self.class_images)]
        if drawn:
            sampled = self.sampler([prompts[i] for i in drawn], height=self.resolution, width=self.resolution,
                                   guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                                   generator=seeded_generators([seeds[i] for i in drawn], self.model.device),
                                   output_type="np", **self.pipeline_kwargs).images
        if len(drawn) < len(seeds):  # a user's class images in these rows
            images = np.zeros((len(seeds), self.resolution, self.resolution, 3), dtype=np.float32)
            if drawn:
                images[drawn] = sampled
            for i, s in enumerate(seeds):
                if s < len(self.class_images):
                    with Image.open(self.class_images[s]) as image:
                        fitted = resize_center_crop(ImageOps.exif_transpose(image).convert("RGB"), self.resolution,
                                                    self.interpolation)
                    images[i] = np.asarray(fitted, dtype=np.float32) / 255  # as_uint8 gives back these pixels
            sampled = images
        images, pixels = as_uint8(sampled)  # exactly what a PNG of the sample holds
        moments, _ = encode_moments(self.pipeline.vae, pixels)
        return prompts, images, moments

    def __call__(self, seeds: list[int]) -> dict:
        prompts, images, moments = self.generate(seeds)
        return {"image": list(images), "text": prompts, "seed": seeds, "latent_moments": moments.cpu().numpy()}


class PromptBankRows(torch.utils.data.Dataset):
    """A text-to-image bank for its loader: `latent_moments` read a batch at a time from Arrow, and the tokens of each
    row's prompt (`input_ids`). Use with `collate_fn=as_batch`."""

    def __init__(self, bank, tokenize):
        self.moments = ArrowBatches(bank, ["latent_moments"])
        texts = bank["text"]
        prompts = sorted(set(texts))  # a bank has few distinct prompts: each is tokenized once
        position = {p: i for i, p in enumerate(prompts)}
        self.input_ids = tokenize(prompts)[torch.tensor([position[t] for t in texts])]

    def __len__(self):
        return len(self.moments)

    def __getitems__(self, indices):
        batch = self.moments.__getitems__(indices)
        batch["input_ids"] = self.input_ids[torch.as_tensor(indices)]
        return batch
