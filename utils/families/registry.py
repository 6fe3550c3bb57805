"""Which model families each command takes: the lists a script detects its pipeline among (`detect_family`, whose
refusal names the commands that do take the pipeline), so a new family is added to the commands that can train or
evaluate it here, and nowhere else."""

from ..infra.errors import UserError
from .base import Family, describe, pipeline_index
from .ddpm import DDPMUNet
from .dit import DiT
from .flux import Flux
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .stable_diffusion import StableDiffusion

TEXT_TO_IMAGE = [StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux]  # train_diff_tuning_text_to_image.py
CONTROLNET_BASES = [StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux]  # a ControlNet can follow them
DEME = [DDPMUNet, *TEXT_TO_IMAGE]  # train_deme.py, merge_timestep_models.py
MEMORY_BANKS = [DiT, *TEXT_TO_IMAGE]  # generate_memory_bank.py
PREMISE = [DiT, *TEXT_TO_IMAGE]  # check_premise.py

COMMANDS = {"train_diff_tuning_dit.py": [DiT], "train_diff_tuning_text_to_image.py": TEXT_TO_IMAGE,
            "train_diff_tuning_controlnet.py": CONTROLNET_BASES, "train_deme.py": DEME, "check_premise.py": PREMISE,
            "generate_memory_bank.py": MEMORY_BANKS}


def commands_taking(index: dict) -> list[str]:
    """The commands that take the pipeline whose model_index.json is `index` (for a refusal to point to)."""
    return [command for command, families in COMMANDS.items() if any(f.matches(index) for f in families)]


def detect_family(name: str, accepted: list[type[Family]], purpose: str, revision=None, cache_dir=None) -> type[Family]:
    """The one of `accepted` families the pipeline folder holds; anything else is refused in one line naming what
    was found, what `purpose` takes, and which commands take what was found."""
    index = pipeline_index(name, revision, cache_dir)
    for family in accepted:
        if family.matches(index):
            return family
    wanted = " or ".join(f.description for f in accepted)
    others = commands_taking(index)
    names = ", ".join(others[:-1]) + f" and {others[-1]}" if len(others) > 1 else "".join(others)
    elsewhere = f" ({names} {'takes' if len(others) == 1 else 'take'} this pipeline)" if others else ""
    raise UserError(f"{name} is {describe(index)}; {purpose} takes {wanted}{elsewhere}")
