"""Unconditional pixel-space DDPM/DDIM pipelines (`UNet2DModel`) as DeMe trains, evaluates and merges them, and the
UNet-pipeline base that Stable Diffusion extends: rows of pixels in [-1, 1], flipped with the run's generator, and
samples for validation, so training and the merge-weight search compute the same loss."""

import os

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel

from ..infra.data import to_tensor
from ..infra.errors import UserError
from .base import Family, Rows

# diffusers' epsilon/v-prediction examples' objective flags (`add_objective_args`): a flow-matching family refuses them
EPSILON_V_FLAGS = {flag: "an epsilon/v-prediction model's objective (diffusers' text-to-image examples)"
                   for flag in ("prediction_type", "snr_gamma", "noise_offset")}


def unet_class(index: dict) -> str | None:
    return (index.get("unet") or [None, None])[1]


class UNetFamily(Family):
    """Shared by the two UNet families: rows of `pixel_values` in [-1, 1] (flipped with the run's generator)."""

    model_class = pipeline_class = tag = ""
    model_key = "unet"  # the pipeline's attribute (and subfolder) of the denoiser
    channel_projections = True  # DeMe's channel maps go on its UNet blocks (utils.methods.channel_projection)
    bank_batch_size = 8  # generation batch of a memory bank
    example_call = ""  # how the card's usage calls the pipeline
    collate = None  # the loader's collate_fn of `transform`'s rows (None: torch's default)
    own_flags = EPSILON_V_FLAGS

    def __init__(self, pipeline, device, dtype=torch.float32, random_flip: bool = False):
        super().__init__(DDPMScheduler.from_config(pipeline.scheduler.config), device, random_flip)
        self.pipeline = pipeline

    @staticmethod
    def load(name: str, revision=None, cache_dir=None, **kwargs):
        return DiffusionPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir, **kwargs)

    @property
    def resolution(self) -> int:
        """The size the model was trained at."""
        return self.pipeline.unet.config.sample_size

    def transform(self, image_column: str, caption_column: str | None, resolution: int):
        """A `Dataset.with_transform` function giving `pixel_values` in [-1, 1]. Flips happen in the training loop
        with the run's own generator, so a resumed run repeats them exactly."""

        def transform(batch):
            return {"pixel_values": [to_tensor(img, resolution) for img in batch[image_column]]}

        return transform

    def rows(self, batch, generator) -> Rows:
        pixels = batch["pixel_values"].to(self.device)
        flip = self.flips(len(pixels), generator)
        if flip is not None:
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        return Rows(pixels, {})

    def predict(self, net, noisy, timesteps, cond):
        return net(noisy, timesteps).sample

    def sampling_pipeline(self, unet):
        """DDIM, the papers' 50-step protocol for DDPM."""
        pipe = self.evaluation_pipeline(unet, {"scheduler": self.pipeline.scheduler})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def evaluation_pipeline(unet, parts: dict) -> DDIMPipeline:
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(parts["scheduler"].config))

    @staticmethod
    def image_size(unet, parts: dict) -> int:
        return unet.config.sample_size

    @torch.no_grad()
    def sample(self, unet, num_images: int, num_inference_steps: int, seed: int, prompts=None, resolution=None):
        """NHWC images in [0, 1]."""
        generator = torch.Generator(self.device).manual_seed(seed)
        return self.sampling_pipeline(unet)(batch_size=num_images, num_inference_steps=num_inference_steps,
                                            generator=generator, output_type="np").images


class DDPMUNet(UNetFamily):
    name, description, tag = "ddpm", "an unconditional UNet2DModel pipeline (DDPM/DDIM)", "ddpm"
    model_class, pipeline_class, example_call = "UNet2DModel", "DDIMPipeline", "pipe(num_inference_steps=50)"
    needs_captions = False

    @classmethod
    def matches(cls, index: dict) -> bool:
        return unet_class(index) == "UNet2DModel"

    @classmethod
    def check_resolution(cls, name, resolution, revision=None, cache_dir=None) -> int:
        """A pixel-space UNet takes its own size only (the default)."""
        try:
            config = UNet2DModel.load_config(name, subfolder="unet", revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {cls.description} from {name!r}: {str(e).strip().splitlines()[0]}") from e
        size = config["sample_size"]
        if resolution is not None and resolution != size:
            raise UserError(f"--resolution {resolution} does not match the model, which takes {size}x{size} images")
        return size




def denoiser_weights_folder(path: str) -> str:
    """The folder holding a denoiser's config and weights: `path/unet` (or `path/transformer`: SD3, Flux) for a
    pipeline folder, else `path`."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        return path
    return os.path.join(path, "unet" if os.path.isdir(os.path.join(path, "unet")) else "transformer")
