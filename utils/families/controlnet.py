"""A ControlNet on a frozen Stable Diffusion 1.x/2.x UNet (`StableDiffusionControlNetPipeline`): how rows (image,
control, caption) are fed, and the memory-bank sampler that annotates each generated image with the run's
annotator."""

import datasets
import torch
from PIL import Image

from .base import Family, Rows
from .latents import sample_latents
from .unet import PromptBankSampler, StableDiffusionUNet


class ControlNetOnSD(Family):
    """Rows: `pixel_values` (encoded by the frozen VAE), `conditioning_pixel_values` in [0, 1] and `captions` (a
    string, or a list of which one is drawn); bank rows: stored `latent_moments`, their own control, and the bank's
    prompt (never dropped). The dropped condition is the empty prompt; the control is kept, as in diffusers'
    train_controlnet.py. Only the ControlNet trains; the UNet runs under autocast in the mixed-precision dtype."""

    name = "controlnet"
    description = "a Stable Diffusion 1.x/2.x pipeline (ControlNet)"
    matches = StableDiffusionUNet.matches

    def __init__(self, pipeline_parts: dict, scheduler, device, tokenize, bank_prompt: str, autocast, dtype):
        super().__init__(scheduler, device)
        self.vae, self.text_encoder, self.unet = (pipeline_parts[k] for k in ("vae", "text_encoder", "unet"))
        self.tokenize, self.autocast, self.dtype = tokenize, autocast, dtype
        self.bank_ids, self.empty_ids = tokenize([bank_prompt]), tokenize([""])

    def rows(self, batch, generator) -> Rows:
        n = len(batch["captions"])
        picks = torch.rand(n, generator=generator, device=self.device).tolist()  # which caption of a list
        captions = [c[min(int(u * len(c)), len(c) - 1)] if isinstance(c, list) else c
                    for c, u in zip(batch["captions"], picks)]
        moments = self.vae.encode(batch["pixel_values"].to(self.device, self.vae.dtype)).latent_dist.parameters
        return Rows(moments.float(), {"input_ids": self.tokenize(captions).to(self.device),
                                      "controls": batch["conditioning_pixel_values"].to(self.device)})

    def bank_rows(self, batch, generator) -> Rows:
        n = len(batch["latent_moments"])
        return Rows(batch["latent_moments"].to(self.device),
                    {"input_ids": self.bank_ids.to(self.device).expand(n, -1),
                     "controls": batch["conditioning_pixel_values"].to(self.device)})

    def drop_condition(self, rows, mask) -> Rows:
        ids = torch.where(mask[:, None], self.empty_ids.to(self.device), rows.cond["input_ids"])
        return Rows(rows.x, {**rows.cond, "input_ids": ids})

    def x0(self, x, generator):
        return sample_latents(x, generator, self.vae.config.scaling_factor)

    def encode(self, cond):
        return {"encoder_hidden_states": self.text_encoder(cond["input_ids"], return_dict=False)[0],
                "controls": cond["controls"]}

    def predict(self, net, noisy, timesteps, cond):
        with self.autocast():
            hidden = cond["encoder_hidden_states"]
            down, mid = net(noisy, timesteps, encoder_hidden_states=hidden,
                            controlnet_cond=cond["controls"].to(self.dtype), return_dict=False)
            return self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=hidden,
                             down_block_additional_residuals=[d.to(self.dtype) for d in down],
                             mid_block_additional_residual=mid.to(self.dtype), return_dict=False)[0]


class ControlBankSampler(PromptBankSampler):
    """Bank rows of a text-to-image Stable Diffusion pipeline for ControlNet Diff-Tuning: samples of one prompt (the
    paper's "a high-quality, detailed, and professional image"), each with its control annotated from the
    generated image by the run's annotator: the columns of `PromptBankSampler` and `conditioning_image`."""

    family = ControlNetOnSD.name

    def __init__(self, pipeline, annotator, prompt: str, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 resolution: int = 512):
        super().__init__(pipeline, [prompt], guidance_scale, num_inference_steps, resolution)
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
