"""Class-conditional DiT (`DiTPipeline`: `DiTTransformer2DModel` on VAE latents, ImageNet's 1000 label rows and the
null class 1000): how rows are fed (images, or latents cached once), its learned-variance loss term, its memory-bank
plan and sampler."""

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.utils import logging as diffusers_logging

from ..diffusion.latents import as_uint8, encode_moments, sample_latents, vae_scale_factor
from ..diffusion.losses import LearnedVarianceLoss, epsilon_mse
from ..infra.data import ArrowBatches, as_batch, image_transform, to_tensor
from ..infra.errors import UserError
from ..metrics.sampling import seeded_generators
from .base import BankPlan, BankSettings, Family, Rows


def _not_the_id2label_type_note(record) -> bool:
    """DiTPipeline reads `id2label` from model_index.json, where JSON makes the class ids strings; diffusers' type
    check then warns on every load of every DiT pipeline (the Hub's too), while DiTPipeline converts the keys itself
    (`int(key)`). Only that note is left out; every other pipeline warning stays."""
    return not record.getMessage().startswith("Expected types for id2label")


diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils").addFilter(_not_the_id2label_type_note)


class DiT(Family):
    """Rows hold VAE posterior moments (`latent_moments`, and `latent_moments_flipped` when cached or banked) or
    `pixel_values` encoded on the fly, and class ids (`labels`; bank rows: the null class). DiT-XL-2 learns its
    variance (8 output channels): the variational-bound term that trains those channels is added to the loss,
    as in DiT's own training."""

    name = "dit"
    description = "a class-conditional DiTPipeline"
    bank_guidance_scale = 1.5  # the official sampler's CFG scale
    denoiser_class, model_key = DiTTransformer2DModel, "transformer"

    def __init__(self, transformer, vae, scheduler, device, random_flip: bool = False):
        super().__init__(scheduler, device, random_flip)
        self.denoiser = transformer  # what predicts (a script may train a wrapped copy)
        self.resolution = transformer.config.sample_size * vae_scale_factor(vae)  # the size it was trained at
        self.vae, self.scaling_factor = vae, vae.config.scaling_factor  # 0.18215 for DiT's sd-vae-ft-ema
        self.null_class = transformer.config.num_embeds_ada_norm  # ImageNet: row 1000 is the null class
        self.latent_shape = latent_shape(transformer.config)
        self.learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
        self.vb_loss = LearnedVarianceLoss(scheduler.betas) if self.learned_sigma else None

    @classmethod
    def matches(cls, index: dict) -> bool:
        return index.get("_class_name") == "DiTPipeline"

    bank_batch_size = 32  # generation batch of a memory bank

    @classmethod
    def check_resolution(cls, name, resolution, revision=None, cache_dir=None) -> int:
        """The transformer's sample size x the VAE's factor exactly (a DiT's position embedding has that size)."""
        factor, config = cls.latent_configs(name, revision, cache_dir)
        size = config["sample_size"]
        if resolution is not None and resolution != size * factor:
            raise UserError(f"--resolution {resolution} gives {resolution / factor:g}x latents but the model takes "
                            f"{size}x; use --resolution {size * factor}")
        return size * factor

    @classmethod
    def from_pipeline(cls, pipeline, device, **options) -> "DiT":
        return cls(pipeline.transformer, pipeline.vae, DDPMScheduler.from_config(pipeline.scheduler.config), device)

    @staticmethod
    def load(name: str, revision=None, cache_dir=None, **kwargs) -> DiTPipeline:
        return DiTPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir, **kwargs)

    @staticmethod
    def switch_off_label_dropout(transformer) -> None:
        """DiT blocks each own a label embedding with 10% dropout; in train mode each would drop labels
        independently. Labels are dropped once per sample (`drop_condition`) instead."""
        for module in transformer.modules():
            if hasattr(module, "class_embedder"):
                module.class_embedder.dropout_prob = 0.0

    @classmethod
    def bank_plan(cls, name: str, settings: BankSettings, options: dict) -> BankPlan:
        """Random classes at CFG 1.5 (default) and 50 DDIM steps; a bank records the latent shape it holds."""
        try:
            config = DiTTransformer2DModel.load_config(name, subfolder="transformer", revision=settings.revision,
                                                       cache_dir=settings.cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a DiTPipeline transformer from {name!r}: "
                            f"{str(e).strip().splitlines()[0]}") from e
        guidance = cls.bank_guidance(settings)
        record = {"family": cls.name, "base_model": name, "latent_shape": list(latent_shape(config))}
        return BankPlan(record, lambda pipe: DiTBankSampler(pipe, guidance, settings.num_inference_steps))

    def bank_view(self, bank) -> tuple:
        return ArrowBatches(bank, self.bank_columns()), as_batch

    def cache_latents(self, ds, image_column: str, resolution: int, autocast, key: list):
        """`ds` with its images replaced by the VAE's posterior moments of each image and of its mirror, computed
        once and cached by `datasets` (reused while the data, `key` (model and revision), VAE, resolution and dtype
        stay the same)."""
        vae, shape = self.vae, self.latent_shape

        def encode_batch(batch):
            pixels = torch.stack([to_tensor(img, resolution) for img in batch[image_column]])
            with autocast():
                moments, flipped = encode_moments(vae, pixels)
            return {"latent_moments": moments.cpu().numpy(), "latent_moments_flipped": flipped.cpu().numpy()}

        return ds.map(
            encode_batch, batched=True, batch_size=32, remove_columns=[image_column],
            features=datasets.Features({
                "labels": ds.features["labels"],
                "latent_moments": datasets.Array3D(shape, "float32"),
                "latent_moments_flipped": datasets.Array3D(shape, "float32"),
                **{c: f for c, f in ds.features.items() if c not in (image_column, "labels")},
            }),
            new_fingerprint=Hasher.hash([ds._fingerprint, *key, dict(vae.config), resolution, str(vae.dtype)]),
            desc="caching latents")

    @staticmethod
    def data_view(ds, image_column: str, resolution: int) -> tuple:
        """(dataset, collate_fn) of the downstream rows (`labels` and cached moments, or images encoded in the
        loop)."""
        if "latent_moments" in ds.column_names:
            return ArrowBatches(ds, ["labels", "latent_moments", "latent_moments_flipped"]), as_batch
        return ds.with_transform(image_transform(image_column, "labels", resolution)), None

    def null_condition(self, n: int, resolution: int | None = None) -> dict:
        return {"class_labels": torch.full((n,), self.null_class)}

    def _moments(self, batch, n, generator):
        flip = self.flips(n, generator)
        if "latent_moments" in batch:
            if flip is None:
                return batch["latent_moments"]
            return torch.where(flip[:, None, None, None], batch["latent_moments_flipped"], batch["latent_moments"])
        pixels = batch["pixel_values"]
        if flip is not None:
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        return self.encode_pixels(pixels)

    def rows(self, batch, generator) -> Rows:
        labels = batch["labels"].to(self.device)
        return Rows(self._moments(batch, len(labels), generator), {"class_labels": labels})

    def bank_rows(self, batch, generator) -> Rows:
        n = len(batch["class_label"])
        labels = torch.full((n,), self.null_class, device=self.device, dtype=torch.long)
        return Rows(self._moments(batch, n, generator), {"class_labels": labels})

    def drop_condition(self, rows, mask) -> Rows:
        labels = rows.cond["class_labels"]
        return Rows(rows.x, {"class_labels": torch.where(mask, torch.full_like(labels, self.null_class), labels)})

    def x0(self, x, generator):
        return sample_latents(x, generator, self.scaling_factor)

    def predict(self, net, noisy, timesteps, cond):
        return net(noisy, timestep=timesteps, class_labels=cond["class_labels"]).sample

    def loss(self, net, batch):
        pred = self.predict(net, batch.noisy, batch.timesteps, batch.cond)
        eps_pred, var_values = pred.chunk(2, dim=1) if self.learned_sigma else (pred, None)
        per_sample = epsilon_mse(eps_pred, batch.target)
        if self.learned_sigma:
            per_sample = per_sample + self.vb_loss(eps_pred, var_values, batch.x0, batch.noisy, batch.timesteps)
        return per_sample

    @staticmethod
    def bank_columns() -> list[str]:
        return ["class_label", "latent_moments", "latent_moments_flipped"]

    # ---- evaluation (evaluate_fid.py): DDIM with classifier-free guidance, as the paper samples
    class_conditional = True

    @staticmethod
    def evaluation_pipeline(transformer, parts: dict) -> DiTPipeline:
        return DiTPipeline(transformer=transformer, vae=parts["vae"],
                           scheduler=DDIMScheduler.from_config(parts["scheduler"].config))

    @staticmethod
    def image_size(transformer, parts: dict) -> int:
        return transformer.config.sample_size * vae_scale_factor(parts["vae"])


def class_pool(pipeline: DiTPipeline) -> list[int]:
    """Classes to sample from: the pipeline's named classes (e.g. ImageNet's 1000), else every label row."""
    if pipeline.labels:
        return sorted(set(pipeline.labels.values()))
    return list(range(pipeline.transformer.config.num_embeds_ada_norm))


def latent_shape(transformer_config) -> tuple[int, int, int]:
    """Shape of one row's stored posterior moments: (2 x in_channels, sample_size, sample_size)."""
    return (2 * transformer_config["in_channels"], transformer_config["sample_size"], transformer_config["sample_size"])


class DiTBankSampler:
    """Bank rows of a class-conditional DiTPipeline: random classes (of its named ones), CFG, DDIM as the official
    sampler. `sampler(seeds)` -> the columns of those rows: the generated `image`, its `class_label` and `seed`, and
    the VAE posterior of the image and its mirror (`latent_moments`, `latent_moments_flipped`)."""

    family = DiT.name

    def __init__(self, pipeline: DiTPipeline, guidance_scale: float = 1.5, num_inference_steps: int = 50):
        self.pipeline, self.guidance_scale, self.num_inference_steps = pipeline, guidance_scale, num_inference_steps
        # DDIM as in the official sampler; the pipeline keeps its own scheduler untouched.
        self.sampler = DiTPipeline(transformer=pipeline.transformer, vae=pipeline.vae,
                                   scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
        self.sampler.set_progress_bar_config(disable=True)
        self.latent_shape = latent_shape(pipeline.transformer.config)
        self.pool = class_pool(pipeline)
        self.model = pipeline.transformer
        self.settings = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}

    @property
    def features(self) -> datasets.Features:
        return datasets.Features({
            "image": datasets.Image(), "class_label": datasets.Value("int64"), "seed": datasets.Value("int64"),
            "latent_moments": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
            "latent_moments_flipped": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
        })

    def __call__(self, seeds: list[int]) -> dict:
        device = self.model.device
        labels = [self.pool[np.random.default_rng(s).integers(len(self.pool))] for s in seeds]
        images = self.sampler(class_labels=labels, guidance_scale=self.guidance_scale,
                              num_inference_steps=self.num_inference_steps,
                              generator=seeded_generators(seeds, device),
                              output_type="np").images
        images, pixels = as_uint8(images)  # exactly what a PNG of the sample holds
        moments, moments_flipped = encode_moments(self.pipeline.vae, pixels)
        return {"image": list(images), "class_label": labels, "seed": seeds,
                "latent_moments": moments.cpu().numpy(), "latent_moments_flipped": moments_flipped.cpu().numpy()}
