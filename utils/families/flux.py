"""Flux.1 (`FluxPipeline`: `FluxTransformer2DModel` on 2x2-packed VAE latents, trained by rectified flow with
`FlowMatchEulerDiscreteScheduler`), fed as diffusers' `train_dreambooth_lora_flux.py` feeds it.

- Text: the CLIP encoder's pooled output (`pooler_output`) is the pooled projection; the T5 encoder's last hidden
  states (at `--max_sequence_length`, default 512 as the example) are the joint-attention states; the text ids are
  zeros. Each caption's CLIP and T5 tokens are stored side by side in one id tensor, as SD3's three are.
- Latents: (z - shift_factor) x scaling_factor, packed into 2x2 patches (`FluxPipeline._pack_latents`) with their
  image ids, and the prediction unpacked again, so a method sees (N, C, H, W) latents as for every family. The VAE
  runs in the run's weight dtype, as the example keeps it.
- Guidance-distilled models (dev: `guidance_embeds`) are given `--guidance_scale` (default 3.5, the example's) in
  training; schnell has no guidance embedding and is given none. Validation and banks sample with the pipeline's
  own scheduler (with its resolution-dependent shift), the embedded guidance at the CFG scale flag.
- The forward process is flow matching as SD3's, with the example's default `--weighting_scheme none` (uniform
  sigmas); the target is noise - x_0 (the Flux example has no output preconditioning). The transformer is given
  sigma (the scheduler's timestep / 1000).
- LoRA: the example's default targets (attention and feed-forward of the double blocks, attention of the single
  blocks); `--train_text_encoder` gives the CLIP encoder adapters, never T5; saved with
  `FluxPipeline.save_lora_weights` in peft's format, as the example saves.
"""

import functools

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ..diffusion.forward_process import FLOW_FLAGS
from ..diffusion.latents import vae_scale_factor
from ..infra.errors import UserError
from ..infra.training import freeze
from .base import Family
from .sd3 import MAX_T5_LENGTH, T5_FLOW_FLAGS_MEANING, StableDiffusion3
from .stable_diffusion import token_ids
from .tuning import lora_layers

FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"]  # train_dreambooth_lora_flux.py's default
FLUX_MAX_SEQUENCE_LENGTH = 512  # T5 tokens per caption: train_dreambooth_lora_flux.py's default
FLUX_GUIDANCE_SCALE = 3.5  # the guidance embedding's value in training (the example's; dev's usual sampling value)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default latent size (1024 px with the 8x VAE)
CONTROLNET_LAYERS = 4  # double and single blocks of a new ControlNet: train_controlnet_flux.py's defaults


class Flux(StableDiffusion3):
    """Rows hold `input_ids` (N, L_CLIP + L_T5): the caption's CLIP tokens and its T5 tokens."""

    name, description, tag = "flux", "a Flux pipeline", "flux"
    model_class, pipeline_class, model_key = "FluxTransformer2DModel", "FluxPipeline", "transformer"
    denoiser_class, scheduler_class = FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
    lora_targets = FLUX_LORA_TARGETS
    hub_tags = ("flux", "flux-diffusers")
    example_call = 'pipe("a photo of a cat", num_inference_steps=28, guidance_scale=3.5)'
    own_flags = {**{flag: T5_FLOW_FLAGS_MEANING for flag in ("max_sequence_length", *FLOW_FLAGS)},
                 "flux_guidance_scale": "Flux's guidance embedding in training",  # the dest of --guidance_scale
                 **{flag: "Flux ControlNets' (blocks a new one copies)"
                    for flag in ("num_double_layers", "num_single_layers")}}
    flow_defaults = {"weighting_scheme": "none"}  # train_dreambooth_lora_flux.py's (SD3's: logit_normal)
    bank_guidance_scale = validation_guidance_scale = FLUX_GUIDANCE_SCALE  # embedded guidance, not CFG
    image_interpolation, flip_before_crop = "bilinear", True  # train_dreambooth_lora_flux.py's preprocessing
    # ControlNets as diffusers' train_controlnet_flux.py: VAE latents of the [-1, 1] control, packed; lanczos
    controlnet_pipeline, controlnet_class_name = "FluxControlNetPipeline", "FluxControlNetModel"
    controlnet_image_arg, controlnet_interpolation = "control_image", "lanczos"

    def __init__(self, pipeline, device, dtype=torch.float32, random_flip: bool = False, bank_condition: str = "empty",
                 train_text_encoder: bool = False, center_crop: bool = False,
                 image_interpolation_mode: str | None = None, max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH,
                 guidance_scale: float = FLUX_GUIDANCE_SCALE,
                 controlnet_layers: tuple[int, int] = (CONTROLNET_LAYERS, CONTROLNET_LAYERS)):
        Family.__init__(self, FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config), device,
                        random_flip)
        self.set_preprocessing(center_crop, image_interpolation_mode)
        self.pipeline, self.prediction_type, self.precondition_outputs = pipeline, "flow_matching", False
        self.vae = freeze(pipeline.vae, device, dtype)
        self.text_encoder = freeze(pipeline.text_encoder, device, dtype)  # a script may swap in a prepared one
        self.text_encoder_2 = freeze(pipeline.text_encoder_2, device, dtype)
        self.clip_length = pipeline.tokenizer.model_max_length  # FluxPipeline's tokenizer_max_length
        self.tokenize = functools.partial(token_ids, [pipeline.tokenizer, pipeline.tokenizer_2],
                                          [self.clip_length, max_sequence_length])
        self.pipeline_kwargs = {"max_sequence_length": max_sequence_length}
        self.bank_condition, self.train_text_encoder = bank_condition, train_text_encoder
        # dev is guidance-distilled: its transformer is given the guidance value; schnell takes none
        self.guidance = guidance_scale if pipeline.transformer.config.guidance_embeds else None
        self.packing = 2 * vae_scale_factor(self.vae)  # pixels per packed latent patch side
        self.controlnet_layers = controlnet_layers  # a new ControlNet's double and single blocks
        self.empty_ids = self.tokenize([""])

    @classmethod
    def matches(cls, index: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "FluxTransformer2DModel"

    @classmethod
    def options(cls, args) -> dict:
        """The T5 length (default 512) and the training guidance (default 3.5), as diffusers' Flux scripts; a new
        ControlNet's blocks (--num_double_layers, --num_single_layers: 4 and 4, as train_controlnet_flux.py)."""
        super(StableDiffusion3, cls).options(args)  # the foreign-flag check, without SD3's own options
        length = getattr(args, "max_sequence_length", None) or FLUX_MAX_SEQUENCE_LENGTH
        if length > MAX_T5_LENGTH:
            raise UserError(f"--max_sequence_length {length} is more than Flux's T5 takes ({MAX_T5_LENGTH} tokens)")
        guidance = getattr(args, "flux_guidance_scale", None)
        options = {"max_sequence_length": length,
                   "guidance_scale": FLUX_GUIDANCE_SCALE if guidance is None else guidance}
        layers = [getattr(args, f"num_{kind}_layers", None) for kind in ("double", "single")]
        if any(n is not None and n < 0 for n in layers):
            raise UserError(f"--num_double_layers and --num_single_layers must be >= 0, got {layers}")
        if any(n is not None for n in layers):  # the ControlNet script's flags
            options["controlnet_layers"] = tuple(CONTROLNET_LAYERS if n is None else n for n in layers)
        return options

    @classmethod
    def from_pipeline(cls, pipeline, device, **options) -> "Flux":
        return cls(pipeline, device, **{"center_crop": True, **options})

    def handoff_scheduler(self, num_steps, latent_shape):
        """FluxPipeline's schedule: sigmas 1 .. 1/N shifted by mu of the image's packed sequence length."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = self.sampling_scheduler(self.pipeline)
        config = scheduler.config
        mu = calculate_shift((latent_shape[-2] // 2) * (latent_shape[-1] // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler

    @classmethod
    def sampling_kwargs(cls, options: dict) -> dict:
        return {"max_sequence_length": options.get("max_sequence_length", FLUX_MAX_SEQUENCE_LENGTH)}

    @classmethod
    def check_resolution(cls, name, resolution, revision=None, cache_dir=None) -> int:
        """A multiple of twice the VAE's factor (latents are packed 2x2); default FluxPipeline's (128 latents: 1024
        px with the 8x VAE)."""
        factor, _ = cls.latent_configs(name, revision, cache_dir)
        resolution = resolution or DEFAULT_SAMPLE_SIZE * factor
        if resolution % (2 * factor):
            raise UserError(f"--resolution {resolution} is not a multiple of {2 * factor} (the VAE's factor {factor} "
                            "x 2: Flux packs latents in 2x2 patches)")
        return resolution

    @classmethod
    def guided_passes(cls, guidance_scale: float) -> bool:
        """One pass a step: the guidance is the transformer's input, not classifier-free guidance."""
        return False

    @staticmethod
    def load(name: str, revision=None, cache_dir=None, **kwargs):
        return FluxPipeline.from_pretrained(name, revision=revision, cache_dir=cache_dir, **kwargs)

    @staticmethod
    def sampler_from(pipeline, scheduler, unet=None, encoders: list | None = None):
        (clip,) = encoders or [pipeline.text_encoder]
        return FluxPipeline(**{**pipeline.components, "scheduler": scheduler, "text_encoder": clip,
                               "transformer": pipeline.transformer if unet is None else unet})

    @staticmethod
    def save_lora(folder: str, transformer, encoders: list | None) -> None:
        """peft-format state dicts, as diffusers' Flux script saves them (`load_lora_weights` reads them)."""
        FluxPipeline.save_lora_weights(
            folder, transformer_lora_layers=lora_layers(transformer, diffusers_format=False),
            text_encoder_lora_layers=lora_layers(encoders[0], diffusers_format=False) if encoders else None)

    @property
    def resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * vae_scale_factor(self.vae)

    @property
    def text_encoders(self) -> list:
        """The CLIP encoder (T5 never gets adapters)."""
        return [self.text_encoder]

    def set_text_encoders(self, encoders: list) -> None:
        (self.text_encoder,) = encoders

    encode_pixels = Family.encode_pixels  # the VAE in the run's dtype, as the Flux example keeps it (not SD3's fp32)

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states, CLIP pooled output), as `FluxPipeline.encode_prompt` computes them."""
        n = self.clip_length
        pooled = self.text_encoder(input_ids[:, :n], output_hidden_states=False).pooler_output
        t5 = self.text_encoder_2(input_ids[:, n:])[0]
        return t5.to(pooled.dtype), pooled

    # ---- ControlNets
    @classmethod
    def check_controlnet_config(cls, control: dict, denoiser: dict) -> str | None:
        for key in ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                    "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"):
            if list(np.atleast_1d(control.get(key))) != list(np.atleast_1d(denoiser.get(key))):
                return f"{key} {control.get(key)} vs {denoiser.get(key)}"
        return None

    @classmethod
    def controlnet_refusal(cls, denoiser: dict) -> str | None:
        return None  # from_transformer copies what blocks there are (the rest start from scratch)

    def new_controlnet(self):
        """FluxControlNetModel.from_transformer as train_controlnet_flux.py calls it: --num_double_layers double and
        --num_single_layers single blocks (default 4 and 4) copied from the transformer, its head sizes."""
        config = self.denoiser.config
        double, single = self.controlnet_layers
        return self.controlnet_class().from_transformer(
            self.denoiser, num_layers=double, num_single_layers=single, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)

    def control_input(self, controls, generator):
        """The control's VAE latents, (z - shift) x scale with z drawn from the posterior of the control in
        [-1, 1], as train_controlnet_flux.py encodes it (packed in `controlnet_predict`)."""
        return self.x0(self.encode_pixels(controls * 2 - 1), generator)

    def controlnet_predict(self, controlnet, denoiser, noisy, timesteps, cond, dtype):
        n, c, h, w = noisy.shape
        inputs = self.transformer_inputs(noisy, timesteps, cond["encoder_hidden_states"], cond["pooled_projections"])
        blocks, singles = controlnet(**inputs, controlnet_cond=FluxPipeline._pack_latents(
            cond["controls"].to(noisy.dtype), n, c, h, w), return_dict=False)
        inputs["hidden_states"] = inputs["hidden_states"].to(dtype)
        out = denoiser(**inputs, controlnet_block_samples=None if blocks is None else [b.to(dtype) for b in blocks],
                       controlnet_single_block_samples=None if singles is None else [s.to(dtype) for s in singles],
                       return_dict=False)[0]
        return self.unpack(out, h, w)

    @staticmethod
    def controlnet_sampler(pipeline, controlnet, scheduler):
        from diffusers import FluxControlNetPipeline

        parts = {k: v for k, v in pipeline.components.items() if k not in ("image_encoder", "feature_extractor")}
        return FluxControlNetPipeline(**{**parts, "controlnet": controlnet, "scheduler": scheduler})

    def transformer_inputs(self, noisy, timesteps, hidden, pooled) -> dict:
        """The transformer's inputs for (N, C, H, W) latents: packed, with image and text ids, sigma and the
        guidance value, as train_dreambooth_lora_flux.py gives them."""
        n, c, h, w = noisy.shape
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=noisy.device)
        return {"hidden_states": FluxPipeline._pack_latents(noisy, n, c, h, w), "timestep": timesteps / 1000,
                "guidance": guidance, "pooled_projections": pooled, "encoder_hidden_states": hidden,
                "txt_ids": torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                "img_ids": FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)}

    def unpack(self, packed, h: int, w: int) -> torch.Tensor:
        """(N, C, h, w) latents back from the transformer's packed output."""
        factor = self.packing // 2
        return FluxPipeline._unpack_latents(packed, h * factor, w * factor, factor)

    def predict(self, net, noisy, timesteps, cond):
        """The velocity of (N, C, H, W) latents: packed, with image and text ids and the guidance value, then
        unpacked."""
        if "encoder_hidden_states" in cond:
            hidden, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
        else:
            hidden, pooled = self.embed(cond["input_ids"])
        out = net(**self.transformer_inputs(noisy, timesteps, hidden, pooled), return_dict=False)[0]
        return self.unpack(out, *noisy.shape[-2:])
