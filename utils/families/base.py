"""What every model family answers, for a script and for a method: how it is detected, which of a script's flags
are its own (`options`: another family's flag is refused in one line), its memory-bank plan (`bank_plan`: the record
a bank made for it carries and the sampler that makes one), its views of a bank and of the data, how a batch of rows
becomes the model's x_0 and conditioning, what the null condition is, how the model predicts, what its target is,
and its per-sample loss.

A method (`utils.methods.diff_tuning.DiffTuning`, `utils.methods.deme.DeMeLoss`) decides which rows, timesteps and
noise a step uses; a family only says how its model is fed. Adding a model family is writing one subclass (and
naming it in `utils.families.registry` for the commands that take it). Reading the pipeline folder
(`pipeline_index`, `utils.families.registry.detect_family`) needs its `model_index.json` alone, so a wrong model is
refused before any weights load."""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from ..diffusion.latents import vae_scale_factor
from ..diffusion.losses import epsilon_mse
from ..infra.errors import UserError
from ..infra.flags import flag_of


@dataclass
class BankSettings:
    """How a memory bank is sampled, as a script's flags say (None: the family's default)."""

    guidance_scale: float | None = None
    num_inference_steps: int = 50
    resolution: int | None = None  # pixels, for prompted families
    prompts: list[str] | None = None  # prompted families: sample i from prompt i mod P
    annotator: object = None  # ControlNet banks: each sample's control annotated by the run's annotator
    vae: str | None = None  # another VAE than the pipeline's (its latents are what the bank stores: recorded)
    revision: str | None = None
    cache_dir: str | None = None
    class_images: tuple[str, ...] = ()  # DreamBooth's class images of a user's folder: rows 0..n-1 (prompted families)


@dataclass
class BankPlan:
    """A family's memory bank for a run: the `record` a bank made for it carries (checked before any weights load,
    against a finished bank too) and `sampler(pipeline)`, the bank sampler of the loaded pre-trained pipeline."""

    record: dict
    sampler: Callable


@dataclass
class Rows:
    """Rows of a micro-batch: `x` becomes x_0 (VAE posterior moments for latent models, pixels otherwise) and
    `cond` holds the model's conditioning inputs, one entry per row (class ids, token ids, controls)."""

    x: torch.Tensor
    cond: dict

    def __len__(self) -> int:
        return len(self.x)

    def then(self, other: "Rows") -> "Rows":
        """These rows followed by `other`'s (bank rows first)."""
        return Rows(torch.cat([self.x, other.x]), {k: torch.cat([self.cond[k], other.cond[k]]) for k in self.cond})


class Family:
    """A model family's answers (one subclass each). `name` is recorded in memory banks and cards."""

    name = ""
    description = ""  # what a user calls it, for messages
    class_conditional = False  # evaluation samples balanced classes with guidance
    needs_captions = False  # its rows carry a caption (text-to-image)
    # a script's flags that only this family takes, with what they are: given for another family, refused
    own_flags: dict[str, str] = {}
    flow_defaults: dict = {}  # a flow-matching family's own defaults of diffusers' --weighting_scheme flags

    def __init__(self, scheduler, device, random_flip: bool = False):
        self.scheduler, self.device, self.random_flip = scheduler, device, random_flip
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")  # flow matching sets its own

    @classmethod
    def matches(cls, index: dict) -> bool:
        """Whether a pipeline's model_index.json is of this family (an abstract family matches none)."""
        return False

    @classmethod
    def options(cls, args) -> dict:
        """This family's constructor options from a script's parsed flags (those it has; absent ones count as not
        given). A flag that only other families take is refused in one line, before anything loads."""
        foreign: dict[str, list[str]] = {}
        for family in _all_families():
            for flag, meaning in family.own_flags.items():
                typed = flag_of(args, flag)  # as the user typed it (Flux's --guidance_scale: its dest differs)
                if flag not in cls.own_flags and getattr(args, flag, None) is not None \
                        and typed not in foreign.get(meaning, []):
                    foreign.setdefault(meaning, []).append(typed)
        for meaning, flags in foreign.items():
            raise UserError(f"{' and '.join(flags)}: {meaning}; this pipeline is {cls.description}: leave "
                            f"{'it' if len(flags) == 1 else 'them'} out")
        return {}

    @classmethod
    def check_resolution(cls, name: str, resolution: int | None, revision=None, cache_dir=None) -> int:
        """The resolution a run trains or samples at: `resolution`, or the model's own when None; a size the model
        cannot take is refused in one line, from the configs alone (a pixel-space family takes any)."""
        return resolution

    @classmethod
    def latent_configs(cls, name: str, revision=None, cache_dir=None) -> tuple[int, dict]:
        """(the VAE's downsampling factor, the denoiser's config) of a latent family's pipeline folder, from its
        configs alone (`denoiser_class` at subfolder `model_key`)."""
        from diffusers import AutoencoderKL

        try:
            factor = vae_scale_factor(AutoencoderKL.load_config(name, subfolder="vae", revision=revision,
                                                                cache_dir=cache_dir))
            config = cls.denoiser_class.load_config(name, subfolder=cls.model_key, revision=revision,
                                                    cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load {cls.description} from {name!r}: {str(e).strip().splitlines()[0]}") from e
        return factor, config

    @classmethod
    def from_pipeline(cls, pipeline, device, **options) -> "Family":
        """The family of a loaded pipeline (no flips), for commands that evaluate rather than train."""
        return cls(pipeline, device, **options)

    bank_guidance_scale = 1.0  # guidance of its bank samples when the settings give none (1: unguided)

    @classmethod
    def bank_guidance(cls, settings: BankSettings) -> float:
        """The guidance scale of its bank samples: the settings', else the family's default."""
        return cls.bank_guidance_scale if settings.guidance_scale is None else settings.guidance_scale

    @classmethod
    def bank_plan(cls, name: str, settings: BankSettings, options: dict) -> BankPlan:
        """The memory bank of a run on pipeline `name` (from its configs alone, before any weights load)."""
        raise UserError(f"{cls.description} has no memory bank")

    # ---- rows -> x_0 and conditioning
    def rows(self, batch: dict, generator) -> Rows:
        """Downstream rows with their own condition (random flips and caption choices drawn from `generator`)."""
        raise NotImplementedError

    def bank_rows(self, batch: dict, generator) -> Rows:
        """Memory-bank rows with the retention condition."""
        raise NotImplementedError(f"{self.description} has no memory bank")

    def bank_view(self, bank) -> tuple:
        """(dataset, collate_fn): the bank as its loader reads it, a batch of rows at a time."""
        raise NotImplementedError(f"{self.description} has no memory bank")

    def null_condition(self, n: int, resolution: int | None = None) -> dict:
        """The null condition of n rows, before `encode` (the class-free branch of guidance); `resolution`: the
        images' size, for a family whose condition records it (SDXL's size ids; default: the model's own)."""
        raise NotImplementedError

    def drop_condition(self, rows: Rows, mask: torch.Tensor) -> Rows:
        """The null condition where `mask` holds (classifier-free guidance dropout)."""
        return rows

    # ---- latents for the evaluation commands (latent families: `self.vae`)
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen VAE's posterior moments of pixels in [-1, 1]."""
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters

    def mean_latents(self, moments: torch.Tensor) -> torch.Tensor:
        """The model's x_0 of the posterior mean (no draw): (mean - shift_factor) x scaling_factor, as `x0` scales a
        draw (the shift is SD3's and Flux's)."""
        config = self.vae.config
        return (moments.chunk(2, dim=1)[0] - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents back to NCHW images in [0, 1] through the frozen VAE."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        return (self.vae.decode(latents.to(self.vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)

    def handoff_scheduler(self, num_steps: int, latent_shape: tuple):
        """The family's sampler set to `num_steps` steps, for finishing noised latents (DDIM on DDPM families; SD3
        and Flux: their flow-matching Euler sampler, as their pipelines set it)."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    def noised_to(self, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 noised to sampling timestep `t` of `scheduler` (from `handoff_scheduler`)."""
        return self.scheduler.add_noise(x0, noise, t.expand(len(x0)))

    def x0(self, x: torch.Tensor, generator) -> torch.Tensor:
        """x_0 from the rows' `x`: pixels as they are (latent families sample from the stored posterior)."""
        return x

    def encode(self, cond: dict) -> dict:
        """The conditioning as the model takes it (e.g. token ids through the frozen text encoder); no gradient."""
        return cond

    def flips(self, n: int, generator):
        """Which of n rows to mirror (None without --random_flip)."""
        return torch.rand(n, generator=generator, device=self.device) < 0.5 if self.random_flip else None

    # ---- prediction, target, loss
    def predict(self, net, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return x0  # "sample"

    def loss(self, net, batch) -> torch.Tensor:
        """Per-sample loss of a composed batch (`x0`, `noise`, `noisy`, `timesteps`, `cond`, `target`)."""
        return self.prediction_loss(self.predict(net, batch.noisy, batch.timesteps, batch.cond), batch)

    def prediction_loss(self, pred: torch.Tensor, batch) -> torch.Tensor:
        """Per-sample loss of the model's prediction on a composed batch (SD3: after its output preconditioning)."""
        return epsilon_mse(pred, batch.target)


def _all_families() -> list[type[Family]]:
    found, stack = [], list(Family.__subclasses__())
    while stack:
        family = stack.pop(0)
        found.append(family)
        stack.extend(family.__subclasses__())
    return found


def pipeline_index(name: str, revision=None, cache_dir=None) -> dict:
    """A pipeline's model_index.json (no weights), or one line saying why it cannot be read."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"{name} does not exist (no such folder; a Hub id is owner/name)")
    try:
        return DiffusionPipeline.load_config(name, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a diffusers pipeline from {name!r}: {str(e).strip().splitlines()[0]}") from e


def describe(index: dict) -> str:
    """What a pipeline folder holds, in words, for a refusal."""
    parts = [f"{k} {v[1]}" for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[1]
             and k in ("unet", "transformer", "text_encoder_2", "text_encoder_3")]
    return f"a {index.get('_class_name', 'pipeline')}" + (f" ({', '.join(parts)})" if parts else "")


def looks_local(name: str) -> bool:
    """A path rather than a Hub id ("name" or "owner/name")."""
    return name.startswith((".", "/", "~")) or name.rstrip("/").count("/") > 1


def check_vae(name: str | None, cache_dir=None, flag: str = "--pretrained_vae_model_name_or_path") -> None:
    """Another VAE (`name`, None: the pipeline's own) is an AutoencoderKL, from its config alone."""
    from diffusers import AutoencoderKL

    if name is None:
        return
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"{flag} {name} does not exist")
    try:
        config = AutoencoderKL.load_config(name, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a VAE from {flag} {name}: {str(e).strip().splitlines()[0]}") from e
    if config.get("_class_name") != "AutoencoderKL":
        raise UserError(f"{flag} {name} holds a {config.get('_class_name')}, not an AutoencoderKL")


def check_variant(name: str, variant: str | None) -> None:
    """A local pipeline folder must hold weight files of `--variant` (e.g. `*.fp16.safetensors`) before loading
    tries; a Hub id is checked by the download."""
    import glob

    if variant and os.path.isdir(name) and not glob.glob(os.path.join(name, "*", f"*.{variant}.*")):
        raise UserError(f"{name} has no weight files of --variant {variant} (*.{variant}.safetensors); leave "
                        "--variant out to load its plain weights")
