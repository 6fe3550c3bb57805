"""Which model families each command takes: the lists a script detects its pipeline among (`detect_family`), so a
new family is added to the commands that can train or evaluate it here, and nowhere else."""

from .ddpm import DDPMUNet
from .dit import DiT
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .stable_diffusion import StableDiffusion

TEXT_TO_IMAGE = [StableDiffusion, StableDiffusionXL, StableDiffusion3]  # train_diff_tuning_text_to_image.py
CONTROLNET_BASES = [StableDiffusion, StableDiffusionXL]  # the pipelines a ControlNetModel can follow
DEME = [DDPMUNet, StableDiffusion]  # train_deme.py, merge_timestep_models.py
MEMORY_BANKS = [DiT, *TEXT_TO_IMAGE]  # generate_memory_bank.py
PREMISE = [DiT, StableDiffusion]  # check_premise.py
