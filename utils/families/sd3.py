"""Stable Diffusion 3 (`StableDiffusion3Pipeline`: `SD3Transformer2DModel` on VAE latents, trained by rectified flow
with `FlowMatchEulerDiscreteScheduler`), fed as diffusers' `train_dreambooth_lora_sd3.py` feeds it.

- Text: three encoders. Both CLIP encoders' penultimate hidden states are concatenated along features and padded
  (or cropped) to the T5 width, then stacked before the T5 states along the sequence; the pooled embedding is both
  CLIP projections concatenated. Each caption's tokens of the three tokenizers are stored side by side in one id
  tensor (CLIP, CLIP, T5 at `--max_sequence_length`), so rows, banks and caption dropout treat them as one.
- The null condition (dropped captions, bank rows with `bank_condition` "empty") is the empty prompt, encoded: what
  the pipeline's classifier-free guidance uses as its negative prompt.
- Latents: (z - shift_factor) x scaling_factor; the VAE stays fp32 and encodes with autocast off, as diffusers'
  SD3 scripts keep it.
- The forward process is flow matching (`utils.diffusion.forward_process.FlowMatchingProcess`: x = (1 - sigma) x_0 +
  sigma eps, the transformer given sigma x 1000); the target is noise - x_0. Validation and banks sample with the
  pipeline's own flow-matching Euler scheduler.
- LoRA: the transformer's joint-attention projections (diffusers' SD3 LoRA defaults); `--train_text_encoder` gives
  the two CLIP encoders adapters, never T5 (as diffusers' script); saved with `StableDiffusion3Pipeline
  .save_lora_weights`.
"""

import functools

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from ..diffusion.forward_process import FLOW_FLAGS
from ..diffusion.latents import sample_latents, vae_scale_factor
from ..diffusion.losses import epsilon_mse
from ..infra.errors import UserError
from ..infra.training import freeze
from .base import Family
from .stable_diffusion import StableDiffusion, token_ids
from .tuning import lora_layers

SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v"]  # train_dreambooth_lora_sd3.py's default
DEFAULT_MAX_SEQUENCE_LENGTH = 77  # T5 tokens per caption: train_dreambooth_lora_sd3.py's default
MAX_T5_LENGTH = 512  # StableDiffusion3Pipeline and FluxPipeline refuse more
T5_FLOW_FLAGS_MEANING = "SD3's and Flux's (T5 tokens, flow matching)"  # the flags both families take


class StableDiffusion3(StableDiffusion):
    """Rows hold `input_ids` (N, 2 L + L_T5): the caption's CLIP tokens twice (L each) and its T5 tokens."""

    name, description, tag = "stable-diffusion-3", "a Stable Diffusion 3 pipeline", "sd3"
    model_class, pipeline_class, model_key = "SD3Transformer2DModel", "StableDiffusion3Pipeline", "transformer"
    denoiser_class, scheduler_class = SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler
    lora_targets = SD3_LORA_TARGETS
    hub_tags = ("sd3", "sd3-diffusers")
    example_call = 'pipe("a photo of a cat", num_inference_steps=28)'
    own_flags = {**{flag: T5_FLOW_FLAGS_MEANING for flag in ("max_sequence_length", *FLOW_FLAGS)},
                 **{flag: "SD3's (output preconditioning, transformer blocks)"
                    for flag in ("precondition_outputs", "lora_blocks")}}
    # ControlNets as diffusers' train_controlnet_sd3.py: VAE latents of the [0, 1] control, bilinear resize
    controlnet_pipeline, controlnet_class_name = "StableDiffusion3ControlNetPipeline", "SD3ControlNetModel"
    controlnet_image_arg, controlnet_interpolation = "control_image", "bilinear"
    controlnet_layers = 12  # SD3ControlNetModel.from_transformer's default, as the example calls it
    channel_projections = False  # DeMe's channel maps are defined on UNet blocks; a transformer has none
    image_interpolation, flip_before_crop = "bilinear", True  # train_dreambooth_lora_sd3.py's preprocessing

    def __init__(self, pipeline, device, dtype=torch.float32, random_flip: bool = False, bank_condition: str = "empty",
                 train_text_encoder: bool = False, center_crop: bool = False,
                 image_interpolation_mode: str | None = None, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                 precondition_outputs: bool = True):
        Family.__init__(self, FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config), device,
                        random_flip)
        self.set_preprocessing(center_crop, image_interpolation_mode)
        self.pipeline, self.prediction_type = pipeline, "flow_matching"
        self.vae = freeze(pipeline.vae, device, torch.float32)
        self.text_encoder = freeze(pipeline.text_encoder, device, dtype)  # a script may swap in prepared ones
        self.text_encoder_2 = freeze(pipeline.text_encoder_2, device, dtype)
        self.text_encoder_3 = freeze(pipeline.text_encoder_3, device, dtype)
        self.clip_length = pipeline.tokenizer.model_max_length
        self.tokenize = functools.partial(token_ids, [pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3],
                                          [self.clip_length, self.clip_length, max_sequence_length])
        self.pipeline_kwargs = {"max_sequence_length": max_sequence_length}
        self.bank_condition, self.train_text_encoder = bank_condition, train_text_encoder
        self.precondition_outputs = precondition_outputs
        self.empty_ids = self.tokenize([""])

    @classmethod
    def matches(cls, index: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "SD3Transformer2DModel"

    @classmethod
    def options(cls, args) -> dict:
        """The T5 length (default 77) and the output preconditioning (default on), as diffusers' SD3 LoRA script."""
        super().options(args)
        length = getattr(args, "max_sequence_length", None) or DEFAULT_MAX_SEQUENCE_LENGTH
        if length > MAX_T5_LENGTH:
            raise UserError(f"--max_sequence_length {length} is more than SD3's T5 takes ({MAX_T5_LENGTH} tokens)")
        precondition = getattr(args, "precondition_outputs", None)
        return {"max_sequence_length": length, "precondition_outputs": True if precondition is None
                else bool(precondition)}

    @classmethod
    def from_pipeline(cls, pipeline, device, **options) -> "StableDiffusion3":
        """For commands that evaluate rather than train: centre crops, and the model's own output (the velocity)
        scored against its own target, noise - x_0 (no preconditioning)."""
        return cls(pipeline, device, **{"center_crop": True, "precondition_outputs": False, **options})

    def handoff_scheduler(self, num_steps, latent_shape):
        scheduler = self.sampling_scheduler(self.pipeline)
        scheduler.set_timesteps(num_steps)
        return scheduler

    def noised_to(self, scheduler, x0, noise, t):
        return scheduler.scale_noise(x0, t.expand(len(x0)), noise)

    @classmethod
    def sampling_kwargs(cls, options: dict) -> dict:
        return {"max_sequence_length": options.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)}

    @staticmethod
    def load(name: str, revision=None, cache_dir=None, **kwargs):
        return StableDiffusion3Pipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir, **kwargs)

    @staticmethod
    def sampling_scheduler(pipeline):
        """The pipeline's own flow-matching Euler sampler (a fresh copy)."""
        return FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)

    @staticmethod
    def sampler_from(pipeline, scheduler, unet=None, encoders: list | None = None):
        first, second = encoders or [pipeline.text_encoder, pipeline.text_encoder_2]
        return StableDiffusion3Pipeline(**{**pipeline.components, "scheduler": scheduler, "text_encoder": first,
                                           "text_encoder_2": second,
                                           "transformer": pipeline.transformer if unet is None else unet})

    @staticmethod
    def save_lora(folder: str, transformer, encoders: list | None) -> None:
        """peft-format state dicts, as diffusers' SD3 script saves them (`load_lora_weights` reads them)."""
        first, second = [lora_layers(e, diffusers_format=False) for e in encoders] if encoders else (None, None)
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=lora_layers(transformer, diffusers_format=False),
            text_encoder_lora_layers=first, text_encoder_2_lora_layers=second)

    @property
    def resolution(self) -> int:
        return self.pipeline.transformer.config.sample_size * vae_scale_factor(self.vae)

    @property
    def text_encoders(self) -> list:
        """The two CLIP encoders (T5 never gets adapters)."""
        return [self.text_encoder, self.text_encoder_2]

    def set_text_encoders(self, encoders: list) -> None:
        self.text_encoder, self.text_encoder_2 = encoders

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The fp32 VAE's posterior moments, autocast off (as diffusers' SD3 scripts keep the VAE)."""
        with torch.autocast(pixels.device.type, enabled=False):
            return self.vae.encode(pixels.float()).latent_dist.parameters

    def x0(self, x, generator):
        config = self.vae.config
        return sample_latents(x, generator, config.scaling_factor) - config.shift_factor * config.scaling_factor

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(joint-attention states, pooled projections), as `StableDiffusion3Pipeline.encode_prompt` computes them."""
        n = self.clip_length
        hidden, pooled = [], []
        for encoder, ids in ((self.text_encoder, input_ids[:, :n]), (self.text_encoder_2, input_ids[:, n:2 * n])):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = self.text_encoder_3(input_ids[:, 2 * n:])[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def encode(self, cond):
        if self.train_text_encoder:  # encoded in `predict`, where gradients reach the CLIP encoders' adapters
            return cond
        hidden, pooled = self.embed(cond["input_ids"])
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def predict(self, net, noisy, timesteps, cond):
        if "encoder_hidden_states" in cond:
            hidden, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
        else:
            hidden, pooled = self.embed(cond["input_ids"])
        return net(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                   pooled_projections=pooled).sample

    @classmethod
    def check_controlnet_config(cls, control: dict, denoiser: dict) -> str | None:
        for key in ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                    "pooled_projection_dim"):
            if control.get(key) != denoiser.get(key):
                return f"{key} {control.get(key)} vs {denoiser.get(key)}"
        return None

    @classmethod
    def controlnet_refusal(cls, denoiser: dict) -> str | None:
        if denoiser.get("num_layers", 0) < 2:
            return (f"its transformer has {denoiser.get('num_layers')} block(s); a new SD3ControlNetModel copies "
                    "blocks before the last (whose context stream ends there): pass --controlnet_model_name_or_path")
        return None

    def new_controlnet(self):
        """SD3ControlNetModel.from_transformer as train_controlnet_sd3.py calls it: the first 12 transformer blocks
        (of a shallower transformer, all but the last, whose context stream ends there), no extra conditioning
        channels."""
        layers = min(self.controlnet_layers, self.denoiser.config.num_layers - 1)
        return self.controlnet_class().from_transformer(self.denoiser, num_layers=layers,
                                                        num_extra_conditioning_channels=0)

    def control_input(self, controls, generator):
        """The control's VAE latents, (z - shift) x scale with z drawn from the posterior of the [0, 1] control, as
        train_controlnet_sd3.py encodes it (drawn from the run's generator)."""
        return self.x0(self.encode_pixels(controls), generator)

    def controlnet_predict(self, controlnet, denoiser, noisy, timesteps, cond, dtype):
        text = {k: cond[k] for k in ("encoder_hidden_states", "pooled_projections")}
        blocks = controlnet(hidden_states=noisy, timestep=timesteps, controlnet_cond=cond["controls"].to(dtype),
                            return_dict=False, **text)[0]
        return denoiser(hidden_states=noisy.to(dtype), timestep=timesteps,
                        block_controlnet_hidden_states=[b.to(dtype) for b in blocks], return_dict=False, **text)[0]

    @staticmethod
    def controlnet_sampler(pipeline, controlnet, scheduler):
        from diffusers import StableDiffusion3ControlNetPipeline

        parts = {k: v for k, v in pipeline.components.items() if k not in ("image_encoder", "feature_extractor")}
        return StableDiffusion3ControlNetPipeline(**{**parts, "controlnet": controlnet, "scheduler": scheduler})

    def target(self, x0, noise, timesteps):
        """Rectified flow's velocity noise - x_0; x_0 itself under `precondition_outputs` (the prediction is then
        turned into an x_0 estimate: `loss`)."""
        return x0 if self.precondition_outputs else noise - x0

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The noise level of each model timestep, shaped to broadcast over `like` (the example's `get_sigmas`)."""
        schedule = self.scheduler.timesteps.to(timesteps.device)
        index = (schedule[None, :] == timesteps[:, None].to(schedule.dtype)).to(torch.int64).argmax(1)
        return self.scheduler.sigmas.to(like.device, like.dtype)[index].reshape(-1, *([1] * (like.ndim - 1)))

    def prediction_loss(self, pred, batch) -> torch.Tensor:
        """Per-sample MSE; with `precondition_outputs` (train_dreambooth_lora_sd3.py's default, after EDM) the
        velocity v is read as the x_0 estimate x_sigma - sigma v and compared with x_0: the flow loss times sigma^2."""
        if self.precondition_outputs:
            pred = pred * (-self.sigmas(batch.timesteps, batch.noisy)) + batch.noisy
        return epsilon_mse(pred, batch.target)
