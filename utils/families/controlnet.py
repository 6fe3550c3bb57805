"""A ControlNet on a frozen Stable Diffusion 1.x/2.x or XL UNet, or an SD3 or Flux transformer
(`StableDiffusionControlNetPipeline`, `StableDiffusionXLControlNetPipeline`, `StableDiffusion3ControlNetPipeline`,
`FluxControlNetPipeline`): its views of the data (image, control, caption) and of a bank, and its memory-bank plan,
whose sampler annotates each generated image with the run's annotator. Everything model-specific is the base
text-to-image family's (`utils.families.stable_diffusion`, `sdxl`, `sd3`, `flux`): tokenizers, encoders, VAE, the
ControlNet's class and how a new one is made, what it is given for a control (pixels, or VAE latents), how it and
the base denoiser predict, the target and the loss."""

import datasets
import torch
from PIL import Image

from ..infra.data import ArrowBatches, as_batch
from ..infra.errors import UserError
from ..infra.image_transforms import as_uint8_tensor, normalized, resize_center_crop, unit
from .base import BankPlan, BankSettings, Family, Rows
from .stable_diffusion import PromptBankSampler, StableDiffusion


def fit_control(image, resolution: int, condition: str, interpolation: str = "bilinear"):
    """A control resized and centre-cropped like its image, as the ControlNet examples do (segmentation maps with
    nearest neighbour: no new colours)."""
    return resize_center_crop(image.convert("RGB"), resolution, "nearest" if condition == "segmentation"
                              else interpolation)


def control_tensor(image, resolution: int, condition: str, interpolation: str = "bilinear") -> torch.Tensor:
    """A control image as the examples feed it: resized, centre-cropped, (3, H, W) in [0, 1] (`ToTensor()`)."""
    return unit(as_uint8_tensor(fit_control(image, resolution, condition, interpolation)))


def image_tensor(image, resolution: int, interpolation: str = "bilinear") -> torch.Tensor:
    """A training image as the examples feed it: resized, centre-cropped, in [-1, 1] (`ToTensor`, `Normalize`)."""
    return normalized(as_uint8_tensor(resize_center_crop(image.convert("RGB"), resolution, interpolation)))


def collate_rows(rows: list[dict]) -> dict:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "conditioning_pixel_values": torch.stack([r["conditioning_pixel_values"] for r in rows]),
            "captions": [r["captions"] for r in rows]}


class ControlBankRows(ArrowBatches):
    """Bank rows: stored latent moments straight from Arrow, and the decoded control."""

    def __init__(self, bank, resolution: int, condition: str, interpolation: str):
        super().__init__(bank, ["latent_moments"])
        self.controls = bank.select_columns(["conditioning_image"])
        self.resolution, self.condition, self.interpolation = resolution, condition, interpolation

    def __getitems__(self, indices):
        batch = super().__getitems__(indices)
        controls = self.controls[list(indices)]["conditioning_image"]
        batch["conditioning_pixel_values"] = torch.stack(
            [control_tensor(c, self.resolution, self.condition, self.interpolation) for c in controls])
        return batch


class ControlNetOnSD(Family):
    """Rows: `pixel_values` (encoded by the frozen VAE), `conditioning_pixel_values` in [0, 1] and `captions` (a
    string, or a list of which one is drawn); bank rows: stored `latent_moments`, their own control, and the bank's
    prompt (never dropped). The dropped condition is the empty prompt; the control is kept, as in diffusers'
    train_controlnet.py. Only the ControlNet trains; the UNet runs under autocast in the mixed-precision dtype.
    `text`: the base pipeline's text-to-image family (an instance); on SDXL every row's size ids are (resolution,
    resolution, crop top, crop left, resolution, resolution), as diffusers' train_controlnet_sdxl.py sets them."""

    name = "controlnet"
    description = "a Stable Diffusion 1.x/2.x, XL, SD3 or Flux pipeline (ControlNet)"

    def __init__(self, text: StableDiffusion, scheduler, unet, bank_prompt: str, autocast, dtype,
                 resolution: int, condition: str, interpolation: str | None = None):
        super().__init__(scheduler, text.device)
        self.text, self.vae, self.unet = text, text.vae, unet  # `unet`: the frozen denoiser (SD3, Flux: transformer)
        self.prediction_type = text.prediction_type  # its target is the base's (noise - x_0 under flow matching)
        self.autocast, self.dtype = autocast, dtype
        self.resolution, self.condition = resolution, condition
        # the examples' resize filter: bilinear (train_controlnet.py), lanczos (train_controlnet_sdxl.py's default)
        self.interpolation = interpolation or text.controlnet_interpolation
        self.bank_ids, self.empty_ids = text.tokenize([bank_prompt]), text.empty_ids
        self.time_ids = None
        if hasattr(text, "time_ids"):  # SDXL's added condition: the same for every row (crop 0, 0 by default)
            geometry = torch.tensor([[resolution, resolution, *(text.crops_coords_top_left or (0, 0))]])
            self.time_ids = text.time_ids(geometry, resolution)

    @staticmethod
    def bank_family(text_class) -> str:
        """The family a ControlNet bank records: "controlnet" on SD 1.x/2.x (as before SDXL), else with the base's."""
        return "controlnet" if text_class is StableDiffusion else f"controlnet-{text_class.name}"

    @classmethod
    def bank_plan(cls, name: str, settings: BankSettings, options: dict) -> BankPlan:
        """Samples of the one prompt (`settings.prompts[0]`, the paper's "a high-quality, detailed, and professional
        image") on the base pipeline (`options["text_family"]`), each with its control annotated by the run's
        annotator; a bank records the base's family, the resolution, the annotator's settings, the prompt and
        another VAE."""
        text_class, annotator, prompt = options["text_family"], settings.annotator, settings.prompts[0]
        if text_class.controlnet_pipeline is None:
            raise UserError(f"ControlNet memory banks of {text_class.description}s are not supported (the "
                            "ControlNet script trains SD 1.x/2.x, SDXL, SD3 and Flux ControlNets); pass --no_controls "
                            "or --prompts_file for a text-to-image bank")
        text_class.check_resolution(name, settings.resolution, settings.revision, settings.cache_dir)
        # one control annotated now: an annotator that fails or returns no image is refused before any sampling
        annotator(Image.new("RGB", (settings.resolution, settings.resolution), (127, 127, 127)))
        record = {"family": cls.bank_family(text_class), "base_model": name, "resolution": settings.resolution,
                  "annotator": annotator.settings, "prompt": prompt}
        if settings.vae:  # a bank's latents are its VAE's
            record["vae"] = settings.vae
        guidance = text_class.bank_guidance(settings)
        return BankPlan(record, lambda pipe: ControlBankSampler(pipe, annotator, prompt, guidance,
                                                                settings.num_inference_steps, settings.resolution,
                                                                text_class))

    # ---- the data and bank views
    def transform(self, image_column: str, control_column: str, caption_column: str):
        """A `Dataset.with_transform` function: `pixel_values` in [-1, 1], the control in [0, 1], the captions."""
        # not the family: datasets hashes the transform
        resolution, condition, interpolation = self.resolution, self.condition, self.interpolation

        def transform(batch):
            return {"pixel_values": [image_tensor(im, resolution, interpolation) for im in batch[image_column]],
                    "conditioning_pixel_values": [control_tensor(c, resolution, condition, interpolation)
                                                  for c in batch[control_column]],
                    "captions": batch[caption_column]}
        return transform

    collate = staticmethod(collate_rows)

    def fit_control(self, control):
        """A control as training feeds it (resized and centre-cropped; for validation pipelines and references)."""
        return fit_control(control, self.resolution, self.condition, self.interpolation)

    def fit_image(self, image):
        """An image resized and centre-cropped as training feeds it."""
        return resize_center_crop(image.convert("RGB"), self.resolution, self.interpolation)

    def bank_view(self, bank) -> tuple:
        return ControlBankRows(bank, self.resolution, self.condition, self.interpolation), as_batch

    def _cond(self, ids, controls, generator) -> dict:
        """The rows' conditioning: tokens, the ControlNet's input for the controls (the base family's: pixels for
        SD/SDXL, VAE latents for SD3 and Flux, drawn from `generator`) and SDXL's size ids."""
        cond = {"input_ids": ids.to(self.device),
                "controls": self.text.control_input(controls.to(self.device), generator)}
        if self.time_ids is not None:
            cond["time_ids"] = self.time_ids.to(self.device).expand(len(ids), -1)
        return cond

    def rows(self, batch, generator) -> Rows:
        n = len(batch["captions"])
        picks = torch.rand(n, generator=generator, device=self.device).tolist()  # which caption of a list
        captions = [c[min(int(u * len(c)), len(c) - 1)] if isinstance(c, list) else c
                    for c, u in zip(batch["captions"], picks)]
        moments = self.text.encode_pixels(batch["pixel_values"].to(self.device))
        return Rows(moments.float(), self._cond(self.text.tokenize(captions), batch["conditioning_pixel_values"],
                                                generator))

    def bank_rows(self, batch, generator) -> Rows:
        n = len(batch["latent_moments"])
        ids = self.bank_ids.expand(n, *self.bank_ids.shape[1:])
        return Rows(batch["latent_moments"].to(self.device), self._cond(ids, batch["conditioning_pixel_values"],
                                                                        generator))

    def drop_condition(self, rows, mask) -> Rows:
        return self.text.drop_condition(rows, mask)

    def x0(self, x, generator):
        return self.text.x0(x, generator)

    def encode(self, cond):
        text = {k: v for k, v in cond.items() if k != "controls"}
        return {**self.text.encode(text), "controls": cond["controls"]}

    def predict(self, net, noisy, timesteps, cond):
        """The frozen base denoiser with the ControlNet `net`, as the base family feeds them (under autocast)."""
        with self.autocast():
            return self.text.controlnet_predict(net, self.unet, noisy, timesteps, cond, self.dtype)

    def target(self, x0, noise, timesteps):
        return self.text.target(x0, noise, timesteps)

    def prediction_loss(self, pred, batch):
        return self.text.prediction_loss(pred, batch)


class ControlBankSampler(PromptBankSampler):
    """Bank rows of a text-to-image Stable Diffusion (1.x/2.x or XL: `family`) pipeline for ControlNet Diff-Tuning:
    samples of one prompt (the paper's "a high-quality, detailed, and professional image"), each with its control
    annotated from the generated image by the run's annotator: the columns of `PromptBankSampler` and
    `conditioning_image`."""

    family = ControlNetOnSD.name

    def __init__(self, pipeline, annotator, prompt: str, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 resolution: int = 512, family: type[StableDiffusion] = StableDiffusion):
        super().__init__(pipeline, [prompt], guidance_scale, num_inference_steps, resolution, family)
        self.family = ControlNetOnSD.bank_family(family)
        self.annotator, self.prompt = annotator, prompt
        self.settings = {"prompt": prompt, "guidance_scale": guidance_scale,
                         "num_inference_steps": num_inference_steps, "resolution": resolution,
                         "annotator": annotator.settings}

    @property
    def features(self) -> datasets.Features:
        return datasets.Features({
            "image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "latent_moments": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
        })

    def __call__(self, seeds: list[int]) -> dict:
        prompts, images, moments = self.generate(seeds)
        controls = [self.annotator(Image.fromarray(img)) for img in images]
        return {"image": list(images), "conditioning_image": controls, "text": prompts, "seed": seeds,
                "latent_moments": moments.cpu().numpy()}
