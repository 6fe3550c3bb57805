#!/usr/bin/env python
"""Diff-Tuning, standard fine-tuning or DreamBooth's prior preservation of a text-to-image Stable Diffusion model.

Diff-Tuning ("Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting", Zhong et al. 2024) keeps
what the pre-trained model knows near the data (small t) and re-learns the large-t denoising: each batch mixes
memory-bank samples of the pre-trained model (on the empty prompt, t ~ xi: "retention") with the new images and
captions (t ~ psi: "adaptation"). DreamBooth's prior preservation (Ruiz et al. 2023) is the special case of a bank
of class images on their own prompt at uniform t: `--with_prior_preservation` (or `--method prior_preservation`)
runs it through the same code, so the two can be compared on the same data; `--method standard` is plain
fine-tuning (diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py without a prior).

    accelerate launch train_diff_tuning_text_to_image.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset <hub id | image folder with metadata.jsonl | parquet folder | save_to_disk folder> \\
        --output_dir out --method diff_tuning [--tuning lora|full] [--train_text_encoder]

Diff-Tuning equals prior preservation exactly with `--method diff_tuning --tau 0 --xi_form official
--bank_condition prompt --retention_weight <prior_loss_weight> --memory_bank_prompts <a file holding the class
prompt>` and as many bank rows as data rows (`--retention_ratio 0.5`, at the same `--train_batch_size`, which counts
data rows for every method): both parts at uniform t,
bank rows on their own prompt. Stable Diffusion 1.x/2.x (epsilon or v-prediction), Stable Diffusion XL (two text
encoders, size-and-crop conditioning as diffusers' SDXL scripts: `utils.families.sdxl`; `--train_text_encoder` gives
both encoders adapters) and Stable Diffusion 3 (three text encoders, rectified flow with diffusers'
`--weighting_scheme`: `utils.families.sd3`; Diff-Tuning's psi and xi multiply the scheme's timestep density, see
docs/methods.md) and Flux.1 (CLIP pooled + T5 text, 2x2-packed latents, the guidance embedding of guidance-distilled
models: `utils.families.flux`; flow matching as SD3's, `--weighting_scheme none` by default as diffusers' Flux
script); other pipelines are refused in one line.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import logging
import math
import os
import sys

import datasets
import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.training_utils import cast_training_params
from PIL import Image
from tqdm.auto import tqdm

from utils.diffusion.forward_process import add_flow_matching_args, add_objective_args
from utils.families.base import BankSettings, check_vae, check_variant
from utils.families.registry import TEXT_TO_IMAGE, detect_family
from utils.families.tuning import (
    TEXT_ENCODER_LORA_TARGETS,
    add_lora_adapter,
    check_lora_targets,
    parameter_counts,
)
from utils.infra import hub, training
from utils.infra.checkpointing import check_resume, resume, run_identity, step_generator
from utils.infra.data import (
    DatasetError,
    ResumableLoader,
    check_captions,
    check_images,
    load_image_dataset,
    require_column,
    worker_options,
)
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, flag_of, parse_flags
from utils.infra.image_transforms import INTERPOLATION_MODES
from utils.infra.outputs import check_output_dir, mark
from utils.methods.diff_tuning import (
    METHODS,
    PRIOR_PRESERVATION,
    DiffTuning,
    add_diff_tuning_args,
    check_diff_tuning_args,
)
from utils.methods.memory_bank import bank_prompts_from_file, cost_note, image_files, is_memory_bank
from utils.metrics.forgetting import FORGETTING_FILE, ForgettingProbe

logger = get_logger(__name__)
SCRIPT = "train_diff_tuning_text_to_image.py"  # marks the output folders it writes (utils.infra.outputs)
# the flags that decide which weights a checkpoint holds: a resume with others is refused
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "method", "tuning",
                  "rank", "train_text_encoder")
BANK_CONDITIONS = ("empty", "prompt")
# the defaults that differ between diffusers' two examples this script stands for: DreamBooth's apply to a folder
# of instance images with --instance_prompt
TEXT_TO_IMAGE_DEFAULTS = {"learning_rate": 1e-4, "train_batch_size": 16}  # train_text_to_image_lora.py
DREAMBOOTH_DEFAULTS = {"learning_rate": 5e-4, "train_batch_size": 4}  # train_dreambooth_lora.py
BANK_STEPS, CLASS_IMAGE_STEPS = 20, 50  # default sampler steps of a Diff-Tuning bank; of DreamBooth's class images
MAX_WIDGET_IMAGES = 8  # final validation images saved as image_<i>.png for the card's gallery
TUNINGS = ("lora", "full")


def dreambooth_data(argv) -> bool:
    """Whether the command line is DreamBooth's (an --instance_prompt), which takes DreamBooth's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--instance_prompt", default=None)
    return pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].instance_prompt is not None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=training.HelpFormatter)
    g = p.add_argument_group("model and data (flag names as in diffusers' text-to-image and DreamBooth examples)")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Stable Diffusion 1.x/2.x (epsilon or v-prediction), Stable Diffusion XL or Stable Diffusion "
                        "3 pipeline: Hub id or folder.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="Another VAE (a diffusers AutoencoderKL folder or Hub id), as diffusers' SDXL scripts take for "
                        "madebyollin/sdxl-vae-fp16-fix; default: the pipeline's own.")
    g.add_argument("--revision", default=None, help="Revision of the pre-trained pipeline on the Hub.")
    g.add_argument("--variant", default=None, help="Variant of the pipeline's weight files, e.g. fp16.")
    g.add_argument("--dataset", "--dataset_name", "--train_data_dir", "--instance_data_dir", dest="dataset",
                   required=True, help="Hub id, image folder (with metadata.jsonl or .csv for captions; DreamBooth's "
                   "plain folder of instance images with --instance_prompt), folder of parquet files, or "
                   "save_to_disk folder. --dataset_name, --train_data_dir and --instance_data_dir are aliases.")
    g.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    g.add_argument("--train_split", default="train", help="Split to train on.")
    g.add_argument("--image_column", default="image", help="Image column.")
    g.add_argument("--caption_column", default=None,
                   help="Caption column: a string or a list of strings, the first used (default: text or caption).")
    g.add_argument("--instance_prompt", default=None,
                   help="DreamBooth: one prompt for every image (e.g. 'a photo of sks dog'); replaces any captions.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Train on a seeded subset of this size.")
    g.add_argument("--repeats", type=int, default=1, help="Repeat the training images this many times per epoch.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Fraction of downstream captions replaced by the empty prompt (classifier-free guidance).")
    g.add_argument("--cache_dir", default=None, help="Where downloaded datasets and models are cached.")
    g.add_argument("--output_dir", default="diff-tuning-text-to-image",
                   help="Where the LoRA weights or pipeline, card, grids, logs and checkpoints go.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training resolution (short side resized, then cropped to a square); a multiple of the VAE "
                        "factor (default: the model's, its UNet's or transformer's sample size x the VAE factor: 512 "
                        "for SD 1.5, 768 for SD 2.x, 1024 for SDXL and SD3).")
    g.add_argument("--center_crop", action="store_true",
                   help="Centre crops; default: a random crop every time an image is drawn (as diffusers' examples).")
    g.add_argument("--image_interpolation_mode", choices=tuple(INTERPOLATION_MODES), default=None,
                   help="Resize filter (default: lanczos, as diffusers' text-to-image and DreamBooth examples; SD3: "
                        "bilinear, as train_dreambooth_lora_sd3.py).")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips of the downstream images.")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every image with the VAE once before training (cached by datasets), as diffusers' "
                        "--cache_latents: each image is cropped once (the centre with --center_crop, else an "
                        "offset drawn once from --seed); --random_flip still flips every step.")
    g.add_argument("--crops_coords_top_left_h", type=int, default=None,
                   help="SDXL: the crop top every image's size conditioning records (default: each image's own crop, "
                        "as diffusers' SDXL text-to-image scripts record it).")
    g.add_argument("--crops_coords_top_left_w", type=int, default=None,
                   help="SDXL: the crop left every image's size conditioning records (default: each image's own).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3 and Flux: T5 tokens per caption (default: 77 for SD3, 512 for Flux, as diffusers' LoRA "
                        "scripts).")
    g.add_argument("--guidance_scale", dest="flux_guidance_scale", type=float, default=None,
                   help="Flux: the guidance embedding's value in training, for guidance-distilled models such as "
                        "FLUX.1-dev (default: 3.5, as train_dreambooth_lora_flux.py; schnell has none and ignores it).")
    g.add_argument("--skip_image_check", action="store_true", help="Do not decode every image before training.")

    g = p.add_argument_group("which weights train")
    g.add_argument("--tuning", choices=TUNINGS, default="lora",
                   help="lora: peft LoRA on the UNet's attention projections (SD3: the transformer's joint-attention "
                        "projections), saved in diffusers' LoRA format; full: every UNet (transformer) weight, saved "
                        "as a stock pipeline.")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank).")
    g.add_argument("--lora_layers", default=None,
                   help="Comma-separated module names that get LoRA adapters, as diffusers' --lora_layers (e.g. "
                        "'to_k,to_q,to_v,to_out.0'; default: the family's attention projections).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout of the LoRA adapters' input.")
    g.add_argument("--lora_blocks", default=None,
                   help="SD3: comma-separated transformer block indices whose --lora_layers get adapters, as "
                        "train_dreambooth_lora_sd3.py's --lora_blocks (default: every block).")
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA (weight-decomposed low-rank adaptation) instead of LoRA, as diffusers' --use_dora.")
    g.add_argument("--text_encoder_lr", type=float, default=None,
                   help="Learning rate of the text encoders' adapters with --train_text_encoder (default: "
                        "--learning_rate).")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also LoRA on the text encoder's attention projections (with --tuning lora; SDXL and SD3: "
                        "both CLIP encoders, never SD3's T5).")

    g = add_diff_tuning_args(
        p, bank_guidance_scale=None, bank_batch_size=8, methods=(*METHODS, PRIOR_PRESERVATION), bank_size=100,
        bank_steps=None, bank_steps_help=f" Default: {BANK_STEPS} for Diff-Tuning (a bank of the default size then "
        f"costs at most a fifth of the default run), {CLASS_IMAGE_STEPS} for prior preservation (DreamBooth's class "
        "images, as diffusers generates them).",
        bank_help="Bank rows: samples of the pre-trained pipeline for the bank prompts (see --memory_bank_prompts).",
        method_help=" prior_preservation: DreamBooth's (class images of --class_prompt at uniform t, as many as "
                    "data rows, on their own prompt; loss = instance + --prior_loss_weight x prior).")
    g.add_argument("--with_prior_preservation", dest="method", action="store_const", const=PRIOR_PRESERVATION,
                   help="DreamBooth's flag: the same as --method prior_preservation.")
    g.add_argument("--prior_loss_weight", dest="retention_weight", type=float, default=argparse.SUPPRESS,
                   help="DreamBooth's name of --retention_weight (the weight of the prior loss).")
    g.add_argument("--class_prompt", default=None,
                   help="The bank's prompt for prior preservation (e.g. 'a photo of a dog'); a bank prompt for "
                        "Diff-Tuning too when no --memory_bank_prompts is given.")
    g.add_argument("--class_data_dir", dest="memory_bank", default=argparse.SUPPRESS,
                   help="DreamBooth's name of --memory_bank: the class images are a memory bank folder.")
    g.add_argument("--sample_batch_size", dest="memory_bank_batch_size", type=int, default=argparse.SUPPRESS,
                   help="DreamBooth's name of --memory_bank_batch_size (class images generated per batch).")
    g.add_argument("--prior_generation_precision", choices=("no", "fp32", "fp16", "bf16"), default=None,
                   help="Precision of the bank's (class images') generation: fp32, or autocast in fp16/bf16 "
                        "(default, and 'no': the run's --mixed_precision).")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="Prior preservation: class images to generate (Diff-Tuning uses --memory_bank_size).")
    g.add_argument("--memory_bank_prompts", default=None,
                   help="A text file of bank prompts, one a line. Default: --class_prompt, else the dataset's "
                        "distinct captions (the base model's own pictures of what the new data shows).")
    g.add_argument("--bank_condition", choices=BANK_CONDITIONS, default=None,
                   help="What bank rows are conditioned on: empty (the paper's null condition; default for "
                        "diff_tuning) or prompt (their own prompt; DreamBooth's, default for prior_preservation).")

    add_objective_args(p)
    add_flow_matching_args(p)
    g = training.add_optimisation_args(
        p, batch_size=TEXT_TO_IMAGE_DEFAULTS["train_batch_size"],
        batch_help="Data rows per device and micro-batch, for every method; bank rows are added (prior "
                   "preservation: as many class rows, as DreamBooth adds them; Diff-Tuning: round(B r / (1 - r)) for "
                   "--retention_ratio r, B at 0.5). Default 16 as train_text_to_image_lora.py; 4 with "
                   "--instance_prompt, as train_dreambooth_lora.py.",
        max_train_steps=1000, learning_rate=TEXT_TO_IMAGE_DEFAULTS["learning_rate"], max_grad_norm=1.0,
        ema_decay=0.9999, lr_warmup_steps=500, weight_decay=1e-2,
        paper="1e-4 as train_text_to_image_lora.py; 5e-4 with --instance_prompt, as train_dreambooth_lora.py")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA).")
    g.add_argument("--optimizer", choices=("adamw", "prodigy"), default="adamw", type=str.lower,
                   help="AdamW, or Prodigy (pip install prodigyopt; --learning_rate around 1.0, as diffusers advises).")
    g.add_argument("--prodigy_beta3", type=float, default=None,
                   help="Prodigy's step-size averaging coefficient (default: sqrt(beta2)).")
    g.add_argument("--prodigy_decouple", type=training.true_or_false, default=True,
                   help="Prodigy: decoupled weight decay.")
    g.add_argument("--prodigy_use_bias_correction", type=training.true_or_false, default=True,
                   help="Prodigy: Adam's bias correction.")
    g.add_argument("--prodigy_safeguard_warmup", type=training.true_or_false, default=True,
                   help="Prodigy: lr out of the D estimate's denominator during warm-up.")
    g = training.add_output_args(p, checkpointing_steps=500, validation_steps=100, num_validation_images=4)
    g.add_argument("--tracker_project_name", default="diff-tuning-text-to-image", help="Project name of the trackers.")
    g.add_argument("--validation_prompt", nargs="+", default=None,
                   help="Prompts of the validation grids (default: the first two training captions).")
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="Guidance scale of validation samples (default: the family's: 7.5 CFG; Flux 3.5, its "
                        "guidance embedding).")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Also validate every N passes over the data, as diffusers' --validation_epochs (default: "
                        "--validation_steps alone).")
    g.add_argument("--validation_batch_size", type=int, default=1,
                   help="Validation images per pipeline call (1, as diffusers' examples draw them; more is faster "
                        "where memory allows; each image keeps its seed either way).")
    g.add_argument("--retention_prompts", nargs="+", default=None,
                   help="Forgetting probe: prompts the base model could already draw, sampled with fixed seeds and "
                        "scored against the base model's own samples (default: the first four bank prompts; none "
                        "without a bank).")
    p.set_defaults(**(DREAMBOOTH_DEFAULTS if dreambooth_data(argv) else TEXT_TO_IMAGE_DEFAULTS))
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    check_args(args)
    return args


def check_args(args):
    """Flags that cannot work, caught before anything is loaded."""
    training.check_common_args(
        args, positive=("resolution", "rank", "num_class_images", "validation_batch_size", "repeats",
        "validation_epochs"))
    if args.text_encoder_lr is not None and not args.text_encoder_lr > 0:
        raise UserError(f"--text_encoder_lr must be > 0, got {args.text_encoder_lr}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if (args.lora_layers is not None or args.lora_blocks is not None) and args.tuning != "lora":
        raise UserError(f"{'--lora_layers' if args.lora_layers else '--lora_blocks'} names where LoRA adapters go: "
                        "use it with --tuning lora")
    if args.lora_blocks is not None and not all(b.strip().isdigit() for b in args.lora_blocks.split(",")):
        raise UserError(f"--lora_blocks takes block indices such as 0,3, got {args.lora_blocks!r}")
    check_diff_tuning_args(args, bank_rows_added=True)
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise UserError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise UserError(f"--max_train_samples must be >= 1, got {args.max_train_samples}")
    if args.method == PRIOR_PRESERVATION and not (args.class_prompt or args.memory_bank_prompts):
        raise UserError("prior preservation needs --class_prompt (the prompt of the class images, e.g. "
                        "'a photo of a dog'), or --memory_bank_prompts for several")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise UserError(f"--snr_gamma must be > 0 (5.0 is the paper's), got {args.snr_gamma}")
    if args.noise_offset is not None and args.noise_offset < 0:
        raise UserError(f"--noise_offset must be >= 0, got {args.noise_offset}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise UserError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}")
    if (args.crops_coords_top_left_h is None) != (args.crops_coords_top_left_w is None):
        raise UserError("--crops_coords_top_left_h and --crops_coords_top_left_w go together; give both or neither")
    if args.train_text_encoder and args.tuning != "lora":
        raise UserError("--train_text_encoder trains LoRA adapters on the text encoder: use it with --tuning lora")
    if args.use_ema and args.tuning != "full":
        raise UserError("--use_ema averages full weights: use it with --tuning full")
    if args.use_8bit_adam or args.optimizer == "prodigy":
        import importlib.util

        if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)")
        if args.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
            raise UserError("--optimizer prodigy needs prodigyopt (pip install prodigyopt)")
        if args.optimizer == "prodigy" and args.use_8bit_adam:
            raise UserError("--use_8bit_adam is an AdamW; leave it out with --optimizer prodigy")
    if args.use_dora and args.tuning != "lora":
        raise UserError("--use_dora trains DoRA adapters: use it with --tuning lora")
    if args.memory_bank_prompts is not None:
        bank_prompts_from_file(args.memory_bank_prompts)
    check_output_dir(args.output_dir, SCRIPT, [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                               ("--dataset", args.dataset), ("--memory_bank", args.memory_bank)])


def load_captioned(args):
    """The training rows with their captions checked: (dataset, caption column)."""
    ds = load_image_dataset(args.dataset, args.train_split, args.dataset_config_name, args.cache_dir)
    require_column(ds, args.image_column, datasets.Image, "image", "--image_column")
    if args.max_train_samples is not None:
        ds = ds.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(ds))))
    if args.repeats > 1:  # DreamBooth's --repeats: every image that many times per epoch
        ds = ds.select(np.tile(np.arange(len(ds)), args.repeats))
    if args.instance_prompt is not None:  # DreamBooth: one prompt for every image
        return ds.add_column("instance_prompt", [args.instance_prompt] * len(ds)), "instance_prompt"
    column = args.caption_column or next((c for c in ("text", "caption") if c in ds.column_names), None)
    if column not in ds.column_names:
        raise DatasetError(f"dataset {args.dataset} has no captions (no column {column or 'text/caption'!r}; its "
                           f"columns: {', '.join(ds.column_names)}): pass --caption_column, or --instance_prompt "
                           "for one prompt for every image")
    check_captions(ds, column, args.dataset)
    return ds, column


def bank_precision(accelerator, precision: str | None):
    """The context a bank is generated in: --prior_generation_precision fp32 (autocast off), fp16 or bf16 (autocast
    in that dtype), or the run's mixed precision (None, 'no')."""
    if precision in (None, "no"):
        return accelerator.autocast()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(accelerator.device.type, dtype=dtype, enabled=precision != "fp32")


def class_folder_images(args) -> list[str]:
    """--class_data_dir naming a folder of images that is not a memory bank (what a DreamBooth user has): its first
    --num_class_images images (Diff-Tuning: --memory_bank_size), which become the bank's first rows (the rest
    generated, as DreamBooth tops up); the bank is written into the output folder, never into theirs. [] otherwise."""
    folder = args.memory_bank
    if flag_of(args, "memory_bank") != "--class_data_dir" or not os.path.isdir(folder) or is_memory_bank(folder):
        return []
    files = image_files(folder)
    if not files:
        raise UserError(f"--class_data_dir {folder} holds no images (.png, .jpg, .jpeg, .webp, .bmp) and is no "
                        "memory bank; name a folder of class images, a bank, or a new folder")
    return files[:args.num_class_images if args.method == PRIOR_PRESERVATION else args.memory_bank_size]


def bank_prompts(args, ds, caption_column) -> list[str]:
    """The bank's prompts: the file, else the class prompt, else the dataset's distinct captions (sorted)."""
    if args.memory_bank_prompts:
        return bank_prompts_from_file(args.memory_bank_prompts)
    if args.class_prompt:
        return [args.class_prompt]
    return sorted({c[0] if isinstance(c, list) else c for c in ds[caption_column]})


@torch.no_grad()
def generate(family, denoiser, encoders, prompts, args, resolution, device):
    """NHWC images in [0, 1] of the family's pipeline with `denoiser` and the text `encoders` (DDIM; SD3: its
    flow-matching Euler sampler; --validation_inference_steps), --validation_batch_size at a time, image i with
    seed + i, so every evaluation and the base model see the same noise."""
    pipe = family.inference_pipeline(denoiser, encoders, family.sampling_scheduler(family.pipeline))
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = family.validation_guidance_scale if args.validation_guidance_scale is None \
        else args.validation_guidance_scale
    images = []
    for i in range(0, len(prompts), args.validation_batch_size):  # each image keeps its own seed in any batch
        chunk = range(i, min(i + args.validation_batch_size, len(prompts)))
        images.append(pipe([prompts[k] for k in chunk], height=resolution, width=resolution,
                           guidance_scale=guidance_scale,
                           num_inference_steps=args.validation_inference_steps, output_type="np",
                           generator=[torch.Generator(device).manual_seed(args.seed + k) for k in chunk],
                           **family.pipeline_kwargs).images)
    return np.concatenate(images)


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = training.make_accelerator(args, args.output_dir, logging_dir)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.push_to_hub:
        hub.check_hub_access(args.hub_token)

    # ---- Configs and data: everything cheap is checked before any weights load.
    name = args.pretrained_model_name_or_path
    family_class = detect_family(name, TEXT_TO_IMAGE, SCRIPT, args.revision, args.cache_dir)
    family_options = family_class.options(args)  # its own flags (SDXL's crop ids, SD3's T5 length); others refused
    check_variant(name, args.variant)
    check_vae(args.pretrained_vae_model_name_or_path, args.cache_dir)
    resolution = family_class.check_resolution(name, args.resolution, args.revision, args.cache_dir)  # default: its own
    try:
        noise_scheduler = family_class.scheduler_class.from_pretrained(name, subfolder="scheduler",
                                                                       revision=args.revision, cache_dir=args.cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {family_class.description} from {name!r}: {str(e).strip().splitlines()[0]}"
                        ) from e
    if args.prediction_type:  # as diffusers' examples: the training target, and the saved pipeline's scheduler
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    prediction_type = noise_scheduler.config.get("prediction_type")  # flow matching has none: noise - x_0
    if prediction_type is not None and prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"the pipeline's scheduler predicts {prediction_type!r}; this script trains epsilon and "
                        "v_prediction models (and SD3's flow matching)")
    ds, caption_column = load_captioned(args)
    class_images = class_folder_images(args)  # DreamBooth's plain folder of class images, read, never written
    diff_tuning = DiffTuning.from_args(
        args, noise_scheduler, condition_dropout=args.proportion_empty_prompts,
        flow_defaults=family_class.flow_defaults,  # Flux: --weighting_scheme none, as diffusers' Flux script
        bank_rows_added=True,  # --train_batch_size: data rows, as DreamBooth's
        **({"bank_dir": os.path.join(args.output_dir, "memory_bank"),
            "bank_source": f"{len(class_images)} class images of {args.memory_bank}"} if class_images else {}))
    if len(ds) < diff_tuning.n_data * accelerator.num_processes:
        raise DatasetError(f"dataset has {len(ds)} images, fewer than one batch of {diff_tuning.n_data} downstream "
                           f"rows on each of {accelerator.num_processes} process(es); lower --train_batch_size")
    prompts = bank_prompts(args, ds, caption_column)
    bank_condition = args.bank_condition or ("prompt" if args.method == PRIOR_PRESERVATION else "empty")
    bank_size = args.num_class_images if args.method == PRIOR_PRESERVATION else args.memory_bank_size
    bank_steps = args.memory_bank_inference_steps or (CLASS_IMAGE_STEPS if args.method == PRIOR_PRESERVATION
                                                       else BANK_STEPS)
    bank_settings = BankSettings(
        args.memory_bank_guidance_scale, bank_steps, resolution, prompts,
        vae=args.pretrained_vae_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir,
        class_images=tuple(class_images))
    bank_plan = family_class.bank_plan(name, bank_settings, family_options)
    diff_tuning.check_bank(bank_plan.record, bank_size, accelerator.num_processes)
    identity = run_identity(args, IDENTITY_FLAGS, SCRIPT, family_class.name)
    check_resume(args.output_dir, args.resume_from_checkpoint, identity, logger)
    if diff_tuning.uses_bank and not is_memory_bank(diff_tuning.bank_dir):  # its cost, before it starts
        steps = args.max_train_steps if args.num_train_epochs is None else args.num_train_epochs * math.ceil(
            len(ds) / (diff_tuning.n_data * accelerator.num_processes * args.gradient_accumulation_steps))
        rows = (diff_tuning.n_bank + diff_tuning.n_data) * accelerator.num_processes * args.gradient_accumulation_steps
        guided = family_class.guided_passes(family_class.bank_guidance(bank_settings))
        logger.info(cost_note(bank_size - len(class_images), bank_steps, guided,
                              steps * rows * 3))
    if not args.skip_image_check:
        with accelerator.main_process_first():
            check_images(ds, args.image_column, lambda it, total: tqdm(it, total=total, desc="checking images",
                                                                       disable=not accelerator.is_local_main_process))
    if accelerator.is_main_process:
        mark(args.output_dir, SCRIPT)  # from here on this script writes into it

    # ---- Models: the VAE (and the text encoders, unless they get adapters) stay frozen; `denoiser` is the trained
    # UNet (SD3: transformer).
    vae = None
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    pipeline = family_class.load(name, args.revision, args.cache_dir, variant=args.variant,
                                 **({"vae": vae} if vae is not None else {}))
    if args.prediction_type:  # the family trains and samples (validation) with the chosen target
        pipeline.scheduler.register_to_config(prediction_type=args.prediction_type)
    dtype = training.weight_dtype(accelerator)
    family = family_class(pipeline, accelerator.device, dtype, args.random_flip, bank_condition,
                          args.train_text_encoder, args.center_crop, args.image_interpolation_mode, **family_options)
    denoiser, encoders = family.denoiser.to(accelerator.device), family.text_encoders
    layers = [t.strip() for t in args.lora_layers.split(",")] if args.lora_layers else None
    blocks = [int(b) for b in args.lora_blocks.split(",")] if args.lora_blocks else None
    if args.tuning == "lora":
        check_lora_targets(denoiser, layers, blocks)  # before the bank: a typo costs nothing
    lora_targets = layers or family.lora_targets
    if blocks:  # SD3's: those blocks only (its own flag: other families refuse it)
        lora_targets = [f"transformer_blocks.{b}.{t}" for b in blocks for t in lora_targets]

    # ---- Memory bank, and the base model's samples for the forgetting probe (both with the untouched weights).
    with bank_precision(accelerator, args.prior_generation_precision):
        bank = diff_tuning.open_bank(accelerator, bank_plan.sampler(pipeline), args.memory_bank_batch_size, args.seed)
    retention_prompts = args.retention_prompts or (prompts[:4] if bank is not None else [])
    base_images = None
    if retention_prompts and accelerator.is_main_process:
        with accelerator.autocast():
            base_images = generate(family, denoiser, encoders, retention_prompts, args, resolution, accelerator.device)

    # ---- Which weights train.
    if args.tuning == "lora":
        if dtype != torch.float32:  # frozen base weights in the mixed-precision dtype; the adapters train in fp32
            denoiser.to(dtype)
        add_lora_adapter(denoiser, args.rank, lora_targets, dropout=args.lora_dropout, use_dora=args.use_dora)
        if args.train_text_encoder:
            for encoder in encoders:
                add_lora_adapter(encoder, args.rank, TEXT_ENCODER_LORA_TARGETS, dropout=args.lora_dropout,
                                 use_dora=args.use_dora)
                encoder.train()  # frozen models are in eval mode; checkpointing and dropout need train mode
        cast_training_params([denoiser, *encoders], dtype=torch.float32)
    else:
        denoiser.requires_grad_(True)
    denoiser.train()
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()
    trainable, total = parameter_counts(denoiser)
    params = [p for m in ([denoiser, *encoders] if args.train_text_encoder else [denoiser]) for p in m.parameters()
              if p.requires_grad]

    # ---- Data loaders and optimisation.
    workers = worker_options(args.dataloader_num_workers)
    if args.cache_latents:  # the VAE's moments of every image, once (cached by datasets)
        with accelerator.main_process_first(), accelerator.autocast():
            rows = family.cache_latents(ds, args.image_column, caption_column, resolution, args.seed,
                                        [name, args.revision, args.pretrained_vae_model_name_or_path])
    else:
        rows = ds.with_transform(family.transform(args.image_column, caption_column, resolution))
    loader = torch.utils.data.DataLoader(rows, batch_size=diff_tuning.n_data, shuffle=True, drop_last=True,
                                         collate_fn=family.collate, **workers)
    bank_loader = diff_tuning.bank_loader(family, workers)
    length = training.run_length(args, len(loader), accelerator.num_processes)  # max steps or epochs
    learning_rate = training.effective_learning_rate(args, accelerator.num_processes)
    optimizer_class, optimizer_options = None, {}
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    if args.optimizer == "prodigy":  # as diffusers' DreamBooth LoRA scripts build it
        import prodigyopt

        optimizer_class = prodigyopt.Prodigy
        optimizer_options = {"beta3": args.prodigy_beta3, "decouple": args.prodigy_decouple,
                             "use_bias_correction": args.prodigy_use_bias_correction,
                             "safeguard_warmup": args.prodigy_safeguard_warmup}
    groups = params
    if args.train_text_encoder and args.text_encoder_lr is not None:  # the encoders' adapters at their own lr
        encoder_params = {id(p) for e in encoders for p in e.parameters()}
        groups = [{"params": [p for p in params if id(p) not in encoder_params]},
                  {"params": [p for p in params if id(p) in encoder_params], "lr": args.text_encoder_lr}]
    optimizer, lr_scheduler = training.make_optimizer(groups, args, accelerator, learning_rate, length.max_train_steps,
                                                      optimizer_class, **optimizer_options)
    ema = training.make_ema(denoiser, args.ema_decay, accelerator) if args.use_ema else None
    denoiser, optimizer, lr_scheduler, loader = accelerator.prepare(denoiser, optimizer, lr_scheduler, loader)
    if args.train_text_encoder:
        encoders = [accelerator.prepare(encoder) for encoder in encoders]
        family.set_text_encoders(encoders)
    if bank_loader is not None:
        bank_loader = accelerator.prepare(bank_loader)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=training.tracker_config(args))

    # ---- Resume: the weights, the data order, and the forgetting curve up to the checkpoint.
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint, logger, ema, identity)
    micro_step = global_step * args.gradient_accumulation_steps
    data_iter = ResumableLoader(loader, accelerator, micro_step)
    bank_iter = ResumableLoader(bank_loader, accelerator, micro_step) if bank_loader is not None else None
    probe = ForgettingProbe(retention_prompts, base_images,
                            os.path.join(args.output_dir, FORGETTING_FILE) if accelerator.is_main_process else None)
    probe.resume(global_step)
    captions = ds[caption_column]
    validation_prompts = args.validation_prompt or [c[0] if isinstance(c, list) else c for c in captions[:2]]
    grid_prompts = [p for p in validation_prompts for _ in range(args.num_validation_images)]

    def validate(step, tag="validation"):
        """The validation grid (EMA weights under --use_ema) and the forgetting probe, to every tracker."""
        model = accelerator.unwrap_model(denoiser, keep_fp32_wrapper=False)
        plain = [accelerator.unwrap_model(encoder, keep_fp32_wrapper=False) for encoder in encoders]
        with training.averaged_weights(model, ema), accelerator.autocast():
            images = generate(family, model, plain, grid_prompts, args, resolution, accelerator.device)
            probed = generate(family, model, plain, retention_prompts, args, resolution, accelerator.device) \
                if retention_prompts else None
        training.log_images(accelerator, tag, images, step, grid_prompts)
        if probed is not None:
            score = probe.add(step, probed)
            accelerator.log({"forgetting/ssim_to_base": score}, step=step)
            logger.info(f"step {step}: forgetting probe, SSIM to the base model's samples {score:.4f}")
        return images, probed

    training.log_running_training(
        logger, examples=len(ds), batch_size=diff_tuning.n_bank + diff_tuning.n_data,
        num_processes=accelerator.num_processes, accumulation=args.gradient_accumulation_steps, length=length,
        first_step=global_step, data_rows_per_micro_batch=diff_tuning.n_data,
        memory_bank_rows_per_micro_batch=diff_tuning.n_bank,
        memory_bank=f"{len(bank)} rows, {bank_condition} condition" if bank is not None else "none",
        trainable_parameters=f"{trainable:,} of {total:,} {family.model_class} parameters ({args.tuning})")
    logs, validated = {}, {}
    progress = tqdm(range(length.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    while global_step < length.max_train_steps:
        generator = step_generator(args.seed, accelerator.process_index, micro_step, accelerator.device)
        micro_step += 1
        with accelerator.accumulate(denoiser, *(encoders if args.train_text_encoder else [])), \
                accelerator.autocast():  # the frozen parts run in the mixed-precision dtype
            loss, parts_of_loss = diff_tuning(family, denoiser, next(data_iter), next(bank_iter) if bank_iter else None,
                                              generator)
            training.apply_gradients(accelerator, params, loss, optimizer, lr_scheduler, args.max_grad_norm,
                                     step=global_step + 1, output_dir=args.output_dir)  # UNet and text-encoder adapters

        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = {"loss": loss.detach().item(), **{k: v.detach().item() for k, v in parts_of_loss.items()},
                "lr": lr_scheduler.get_last_lr()[0]}
        if ema is not None:
            ema.step(denoiser.parameters())
        training.log_step(accelerator, progress, logs, global_step)
        if accelerator.is_main_process and (
                (args.validation_steps and global_step % args.validation_steps == 0)
                or (args.validation_epochs and global_step % (args.validation_epochs * length.steps_per_epoch) == 0)):
            validated = {global_step: validate(global_step)}
        if global_step % length.checkpointing_steps == 0:  # after the step's records: a resume continues them
            training.checkpoint(
                accelerator, denoiser, global_step, args.output_dir, args.checkpoints_total_limit, identity,
                logger)
    progress.close()

    # ---- Save the LoRA weights (diffusers' format) or a stock pipeline, the grids and a model card.
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(denoiser)
    plain = [accelerator.unwrap_model(encoder) for encoder in encoders]
    if ema is not None:
        ema.copy_to(model.parameters())
    for trained in [model, *(plain if args.train_text_encoder else [])]:  # nothing non-finite is saved or pushed
        training.check_finite_weights(accelerator, trained, global_step, args.output_dir)
    if accelerator.is_main_process:
        model.eval()
        if args.tuning == "lora":
            family.save_lora(args.output_dir, model, plain if args.train_text_encoder else None)
        else:
            full = family_class.load(name, args.revision, args.cache_dir, variant=args.variant,
                                     **{family.model_key: model.to(torch.float32)},
                                     **({"vae": vae} if vae is not None else {}))
            if args.prediction_type:  # the model now predicts this: its scheduler must say so
                full.scheduler.register_to_config(prediction_type=args.prediction_type)
            full.save_pretrained(args.output_dir)
        images, probed = validated.get(global_step) or validate(global_step, "final")
        training.image_grid(images, cols=args.num_validation_images).save(os.path.join(args.output_dir, "samples.png"))
        widget = []  # the Hub's gallery, as diffusers' scripts fill it: image_<i>.png with its prompt
        for i, (image, prompt) in enumerate(list(zip(images, grid_prompts))[:MAX_WIDGET_IMAGES]):
            Image.fromarray((image * 255).round().astype(np.uint8)).save(os.path.join(args.output_dir,
                                                                                      f"image_{i}.png"))
            widget.append({"text": prompt, "output": {"url": f"image_{i}.png"}})
        if probed is not None:
            training.image_grid(np.concatenate([base_images, probed]), cols=len(retention_prompts)).save(
                os.path.join(args.output_dir, "before_after.png"))
            probe.plot(os.path.join(args.output_dir, "forgetting.png"), f"{args.method}, {args.tuning}")
        repo = hub.hub_repo_id(args.hub_model_id, args.output_dir, args.push_to_hub, args.hub_token)
        write_card(args, family, diff_tuning, bank_condition, trainable, total, logs, accelerator.mixed_precision,
                   learning_rate, probe, validation_prompts, global_step, resolution, widget, repo)
        if args.push_to_hub:
            diff_tuning.push(args.output_dir, repo, args.hub_token, args.hub_private_repo, logger)
    # The DDP wrappers must go before the process group ends (utils.infra.training.end_training).
    denoiser = encoders = optimizer = lr_scheduler = loader = bank_loader = None  # noqa: F841
    training.end_training(accelerator)
    return model


def write_card(args, family, diff_tuning, bank_condition, trainable, total, last_logs, mixed_precision,
               learning_rate, probe, validation_prompts, steps, resolution, widget, repo):
    """`family`: the pipeline's (its pipeline class and tags); `diff_tuning`: the method (its card text, fields and
    tag); `steps`: the optimizer steps trained; `resolution`: the one trained at; `widget`: the gallery."""
    method = {"diff_tuning": "Diff-Tuning", "standard": "standard fine-tuning",
              PRIOR_PRESERVATION: "DreamBooth prior preservation"}[args.method]
    hyper = {"method": args.method, "tuning": args.tuning, "steps": steps,
             "train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
             "learning_rate": learning_rate, "lr_scheduler": args.lr_scheduler, "resolution": resolution,
             "proportion_empty_prompts": args.proportion_empty_prompts, "use_ema": args.use_ema,
             "mixed_precision": mixed_precision, "seed": args.seed,
             "trainable_unet_parameters": f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"}
    hyper.update({"center_crop": args.center_crop, "random_flip": args.random_flip,
                  "image_interpolation_mode": family.interpolation})
    hyper.update({k: getattr(args, k) for k in ("prediction_type", "snr_gamma", "noise_offset", "precondition_outputs")
                  if getattr(args, k) is not None})
    if args.tuning == "lora":
        hyper.update({"rank": args.rank, "train_text_encoder": args.train_text_encoder})
    if diff_tuning.uses_bank:
        hyper.update({**diff_tuning.card_fields(), "bank_condition": bank_condition})
        if args.method == PRIOR_PRESERVATION:
            hyper["prior_loss_weight"] = args.retention_weight
    metrics = {}
    if probe.points:
        metrics["forgetting probe (SSIM to the base model's samples, same seeds; 1 = unchanged), final"] = \
            f"{probe.points[-1]['ssim_to_base']:.4f} on {len(probe.prompts)} retention prompt(s)"
    prompt = validation_prompts[0].replace('"', "'")
    pipeline_class = family.pipeline_class
    if args.tuning == "lora":
        load = (f'pipe = {pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}")\n'
                f'pipe.load_lora_weights("{repo}")')
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{repo}")'
    usage = f'''import torch
from diffusers import {pipeline_class}
{load}
image = pipe("{prompt}", num_inference_steps=50, generator=torch.manual_seed(0)).images[0]'''
    description = (
        f"{'LoRA adapters for' if args.tuning == 'lora' else 'A fine-tune of'} `{args.pretrained_model_name_or_path}` "
        f"trained on `{args.dataset}` with {method}. "
        + diff_tuning.card_text()
        + (" `before_after.png`: the base model's samples (top) and this model's (bottom) for prompts it could "
           "already draw, same seeds." if probe.points else ""))
    tags = ["text-to-image", "diffusers", family.tag, *family.hub_tags, args.tuning, diff_tuning.tag]
    if args.tuning == "lora":
        tags += ["template:sd-lora"]  # the Hub's LoRA page template, as diffusers' LoRA scripts tag
    if args.instance_prompt:
        tags.append("dreambooth")
    hub.save_training_card(
        args.output_dir, title=f"{method} of {args.pretrained_model_name_or_path} ({args.tuning})",
        base_model=args.pretrained_model_name_or_path, dataset=args.dataset, last_logs=last_logs, metrics=metrics,
        tags=tags, description=description, hyperparameters=hyper, usage=usage, image_heading="Validation samples",
        instance_prompt=args.instance_prompt, widget=widget)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
