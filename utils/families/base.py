"""What every model family answers for a method: how a batch of rows becomes the model's x_0 and conditioning, what
the null condition is, how the model predicts, what its target is, and its per-sample loss.

A method (`utils.methods.diff_tuning.DiffTuning`, `utils.methods.deme.DeMeLoss`) decides which rows, timesteps and
noise a step uses; a family only says how its model is fed. Adding a model family is writing one subclass.
Reading the pipeline folder (`pipeline_index`, `detect_family`) needs its `model_index.json` alone, so a wrong model
is refused before any weights load."""

import os
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from ..diffusion.losses import epsilon_mse
from ..infra.errors import UserError


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

    def __init__(self, scheduler, device, random_flip: bool = False):
        self.scheduler, self.device, self.random_flip = scheduler, device, random_flip
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")  # flow matching sets its own

    @classmethod
    def matches(cls, index: dict) -> bool:
        """Whether a pipeline's model_index.json is of this family."""
        raise NotImplementedError

    # ---- rows -> x_0 and conditioning
    def rows(self, batch: dict, generator) -> Rows:
        """Downstream rows with their own condition (random flips and caption choices drawn from `generator`)."""
        raise NotImplementedError

    def bank_rows(self, batch: dict, generator) -> Rows:
        """Memory-bank rows with the retention condition."""
        raise NotImplementedError(f"{self.description} has no memory bank")

    def drop_condition(self, rows: Rows, mask: torch.Tensor) -> Rows:
        """The null condition where `mask` holds (classifier-free guidance dropout)."""
        return rows

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
        return epsilon_mse(self.predict(net, batch.noisy, batch.timesteps, batch.cond), batch.target)


def pipeline_index(name: str, revision=None, cache_dir=None) -> dict:
    """A pipeline's model_index.json (no weights), or one line saying why it cannot be read."""
    try:
        return DiffusionPipeline.load_config(name, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a diffusers pipeline from {name!r}: {str(e).strip().splitlines()[0]}") from e


def describe(index: dict) -> str:
    """What a pipeline folder holds, in words, for a refusal."""
    parts = [f"{k} {v[1]}" for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[1]
             and k in ("unet", "transformer", "text_encoder_2", "text_encoder_3")]
    if "XL" in index.get("_class_name", "") or (index.get("text_encoder_2") and "unet" in index):
        parts.insert(0, "Stable Diffusion XL is not supported yet")
    if "Flux" in index.get("_class_name", ""):  # a family of its own: packed latents, guidance embedding, CLIP + T5
        parts.insert(0, "Flux is not supported")
    return f"a {index.get('_class_name', 'pipeline')}" + (f" ({', '.join(parts)})" if parts else "")


def detect_family(name: str, accepted: list[type[Family]], purpose: str, revision=None, cache_dir=None) -> type[Family]:
    """The one of `accepted` families the pipeline folder holds; anything else is refused in one line naming what
    was found and what `purpose` takes."""
    index = pipeline_index(name, revision, cache_dir)
    for family in accepted:
        if family.matches(index):
            return family
    wanted = " or ".join(f.description for f in accepted)
    raise UserError(f"{name} is {describe(index)}; {purpose} takes {wanted}")


def looks_local(name: str) -> bool:
    """A path rather than a Hub id ("name" or "owner/name")."""
    return name.startswith((".", "/", "~")) or name.rstrip("/").count("/") > 1


def check_variant(name: str, variant: str | None) -> None:
    """A local pipeline folder must hold weight files of `--variant` (e.g. `*.fp16.safetensors`) before loading
    tries; a Hub id is checked by the download."""
    import glob

    if variant and os.path.isdir(name) and not glob.glob(os.path.join(name, "*", f"*.{variant}.*")):
        raise UserError(f"{name} has no weight files of --variant {variant} (*.{variant}.safetensors); leave "
                        "--variant out to load its plain weights")
