#!/usr/bin/env python
"""Diff-Tuning (and standard training) of a ControlNet on Stable Diffusion (1.x/2.x, XL, 3) or Flux, with a
sudden-convergence tracker.

Diff-Tuning ("Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting", Zhong et al. 2024, its
ControlNet experiment): each micro-batch mixes memory-bank rows (samples of the pre-trained Stable Diffusion for
the default prompt, each with its control annotated by the run's annotator; t ~ xi, "retention") with downstream
rows (image, control, caption; t ~ psi, "adaptation"). Only the ControlNet trains. `--method standard` is plain
ControlNet training (diffusers' examples/controlnet/train_controlnet.py) through the same code and tracker.

    accelerate launch train_diff_tuning_controlnet.py --pretrained_model_name_or_path \\
        stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset <hub id | image folder with metadata.jsonl | \\
        save_to_disk folder> --condition canny --output_dir out --method diff_tuning

Defaults reproduce the paper: 512 px, batch 4 (2 bank + 2 data rows), lr 1e-5 constant, 15,000 steps, tau 1, a
5,000-sample bank, control fidelity every 100 steps with 50 sampling steps. On a Stable Diffusion XL base (pass
`--resolution 1024`) the ControlNet is copied from the SDXL UNet and fed as diffusers' train_controlnet_sdxl.py feeds
it: both text encoders, the pooled embedding and the size ids (resolution, resolution, --crops_coords_top_left_h/w,
resolution, resolution); it loads in `StableDiffusionXLControlNetPipeline`. On SD3 an `SD3ControlNetModel` (12 blocks
copied from the transformer) and on Flux a `FluxControlNetModel` (--num_double_layers, --num_single_layers) are fed as
diffusers' train_controlnet_sd3.py and train_controlnet_flux.py feed them: the control VAE-encoded (packed for Flux),
flow matching with diffusers' --weighting_scheme flags (Diff-Tuning's psi and xi on top, as in the text-to-image
script); they load in `StableDiffusion3ControlNetPipeline` / `FluxControlNetPipeline`.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import copy
import logging
import os
import sys

import datasets
import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm

from utils.diffusion.forward_process import add_flow_matching_args
from utils.families.base import BankSettings, check_vae, check_variant, looks_local
from utils.families.controlnet import ControlNetOnSD
from utils.families.registry import CONTROLNET_BASES, detect_family
from utils.families.stable_diffusion import StableDiffusion
from utils.infra import hub, training
from utils.infra.checkpointing import check_resume, resume, run_identity, step_generator
from utils.infra.data import (
    DatasetError,
    ResumableLoader,
    check_captions,
    check_images,
    load_image_dataset,
    worker_options,
)
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.image_transforms import INTERPOLATION_MODES
from utils.infra.outputs import check_output_dir, mark
from utils.methods.diff_tuning import DiffTuning, add_diff_tuning_args, check_diff_tuning_args
from utils.metrics.annotators import add_annotator_args, annotator_of
from utils.metrics.fidelity import (
    CONVERGENCE_FILE,
    METRICS,
    ConvergenceTracker,
    check_threshold,
    fidelity_score,
    reference_map,
)
from utils.metrics.sampling import seeded_generators

logger = get_logger(__name__)
SCRIPT = "train_diff_tuning_controlnet.py"  # marks the output folders it writes (utils.infra.outputs)
# the flags that decide which weights a checkpoint holds: a resume with others is refused
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision",
                  "controlnet_model_name_or_path", "method", "condition")
DEFAULT_BANK_PROMPT = "a high-quality, detailed, and professional image"  # the paper's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=training.HelpFormatter)
    g = p.add_argument_group("model and data (flag names as in diffusers' train_controlnet.py)")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Stable Diffusion 1.x/2.x, XL or 3, or Flux pipeline: Hub id or folder.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="Another VAE (a diffusers AutoencoderKL), as diffusers' SDXL scripts take "
                        "madebyollin/sdxl-vae-fp16-fix; default: the pipeline's own.")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="ControlNet to start from (default: a new one copied from the UNet's encoder; SD3, Flux: from "
                        "the transformer's first blocks).")
    g.add_argument("--revision", default=None, help="Revision of the pre-trained pipeline on the Hub.")
    g.add_argument("--variant", default=None, help="Variant of the pipeline's weight files, e.g. fp16.")
    g.add_argument("--tokenizer_name", default=None, help="Tokenizer, if not the pipeline's (SD 1.x/2.x).")
    g.add_argument("--dataset", "--dataset_name", "--train_data_dir", dest="dataset", required=True,
                   help="Hub id, image folder with a metadata.jsonl (file_name, conditioning_image_file_name, text), "
                        "or save_to_disk folder. --dataset_name and --train_data_dir are aliases.")
    g.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    g.add_argument("--train_split", default="train", help="Split to train on.")
    g.add_argument("--image_column", default="image", help="Target image column.")
    g.add_argument("--conditioning_image_column", default="conditioning_image", help="Control image column.")
    g.add_argument("--caption_column", default="text", help="Caption column: a string or a list of strings.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Train on a seeded subset of this size.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Fraction of downstream captions replaced by the empty prompt (bank rows never are).")
    g.add_argument("--annotate_dataset", action="store_true",
                   help="Compute the control column with the run's annotator (cached by datasets) when the data "
                        "has none, or replace it.")
    g.add_argument("--cache_dir", default=None, help="Where downloaded datasets and models are cached.")
    g.add_argument("--output_dir", default="diff-tuning-controlnet", help="Where the ControlNet, card, curve, logs "
                   "and checkpoints go.")
    g.add_argument("--resolution", type=int, default=512,
                   help="Training resolution (short side resized, centre crop, as diffusers' ControlNet examples); a "
                        "multiple of the VAE factor (x 2 for SD3 and Flux; 1024 for SDXL, SD3 and Flux).")
    g.add_argument("--image_interpolation_mode", choices=tuple(INTERPOLATION_MODES), default=None,
                   help="Resize filter of images and controls (default: the family's example's: bilinear on SD "
                        "1.x/2.x and SD3, lanczos on SDXL and Flux; segmentation controls always nearest).")
    g.add_argument("--crops_coords_top_left_h", type=int, default=None,
                   help="SDXL: the crop top every row's size ids record (diffusers' train_controlnet_sdxl.py; "
                        "default: 0).")
    g.add_argument("--crops_coords_top_left_w", type=int, default=None,
                   help="SDXL: the crop left every row's size ids record (default: 0).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3 and Flux: T5 tokens per caption (default: 77 for SD3, 512 for Flux).")
    g.add_argument("--guidance_scale", dest="flux_guidance_scale", type=float, default=None,
                   help="Flux: the guidance embedding's value in training (default: 3.5, as train_controlnet_flux.py).")
    g.add_argument("--num_double_layers", type=int, default=None,
                   help="Flux: double blocks of a new ControlNet (default: 4, as train_controlnet_flux.py).")
    g.add_argument("--num_single_layers", type=int, default=None,
                   help="Flux: single blocks of a new ControlNet (default: 4).")
    g.add_argument("--skip_image_check", action="store_true", help="Do not decode every image and control first.")

    add_annotator_args(p)

    add_flow_matching_args(p)
    g = add_diff_tuning_args(p, bank_guidance_scale=None, bank_batch_size=8,
                             bank_help="Bank rows: samples of --memory_bank_prompt, each with its control annotated "
                                       "by the run's annotator.")
    g.add_argument("--memory_bank_prompt", default=DEFAULT_BANK_PROMPT,
                   help="Prompt of the bank samples; bank rows train with it, never dropped.")

    g = training.add_optimisation_args(
        p, batch_size=4, batch_help="Batch per device, bank and data together (the paper: "
        "4 = 2 bank + 2 data rows).", max_train_steps=15000, learning_rate=1e-5,
        max_grad_norm=1.0, ema_decay=0.9999, lr_warmup_steps=500, weight_decay=1e-2,
        paper="paper: 15K steps, lr 1e-5; diffusers' train_controlnet.py: 5e-6")
    g.add_argument("--set_grads_to_none", action="store_true",
                   help="Free gradients after each step instead of zeroing them (less memory).")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA).")
    g = training.add_output_args(p, checkpointing_steps=500, validation_steps=100, num_validation_images=4)
    g.add_argument("--tracker_project_name", default="diff-tuning-controlnet", help="Project name of the trackers.")
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="Guidance scale of validation samples (default: the family's: 7.5 CFG; Flux 3.5, its "
                        "guidance embedding).")
    g.add_argument("--validation_prompt", nargs="+", default=None,
                   help="Extra qualitative grids: prompts (one, or one per --validation_image).")
    g.add_argument("--validation_image", nargs="+", default=None,
                   help="Extra qualitative grids: control images (one, or one per --validation_prompt).")

    g = p.add_argument_group("sudden-convergence tracker")
    g.add_argument("--validation_dataset", default=None,
                   help="Held-out rows (same layout as --dataset); default: a seeded hold-out of the training data.")
    g.add_argument("--validation_split", default="train", help="Split of --validation_dataset.")
    g.add_argument("--num_validation_samples", type=int, default=16,
                   help="Held-out rows scored at every evaluation (each with a fixed seed).")
    g.add_argument("--validation_batch_size", type=int, default=8, help="Images per sampling batch.")
    g.add_argument("--fidelity_blur_sigma", type=float, default=2.0,
                   help="canny/sketch: Gaussian blur (pixels) of both maps before SSIM.")
    g.add_argument("--convergence_threshold", type=float, default=None,
                   help="Score at which the control counts as learned (default: the paper's: canny 0.55 SSIM, "
                        "sketch 0.75 SSIM, depth 0.04 MSE, normal 0.06 MSE, segmentation 0.5 accuracy).")
    g.add_argument("--convergence_patience", type=int, default=1,
                   help="Consecutive evaluations past the threshold before it counts.")
    g.add_argument("--stop_at_convergence", action="store_true", help="End training at the convergence step.")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    check_args(args)
    return args


def check_args(args):
    """Flags that cannot work, caught before anything is loaded."""
    training.check_common_args(args, positive=("resolution", "num_validation_samples", "convergence_patience",
                                               "validation_batch_size"))
    check_diff_tuning_args(args)
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise UserError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise UserError(f"--max_train_samples must be >= 1, got {args.max_train_samples}")
    annotator = annotator_of(args)  # unknown condition, a missing --annotator_model, an --annotator not importable
    check_threshold(args.condition, args.convergence_threshold)
    annotator.check_model()  # an --annotator_model that does not exist or is of another task
    if args.stop_at_convergence and not args.validation_steps:
        raise UserError("--stop_at_convergence needs the tracker: set --validation_steps above 0")
    if args.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)")
    prompts, images = args.validation_prompt or [], args.validation_image or []
    if bool(prompts) != bool(images) or (len(prompts) != len(images) and 1 not in (len(prompts), len(images))):
        raise UserError("--validation_prompt and --validation_image go together: one of each, one of one and "
                        "several of the other, or as many of each")
    for path in images:
        if not os.path.isfile(path):
            raise UserError(f"--validation_image {path} does not exist")
    check_output_dir(args.output_dir, SCRIPT, [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                               ("--dataset", args.dataset),
                                               ("--controlnet_model_name_or_path", args.controlnet_model_name_or_path),
                                               ("--validation_dataset", args.validation_dataset)])


def check_pipeline(args) -> tuple[type[StableDiffusion], dict, object]:
    """From the configs alone (no weights): a pipeline whose denoiser a ControlNet can follow (SD 1.x/2.x and XL
    trained to predict epsilon or v, SD3 and Flux by flow matching), and a --controlnet_model_name_or_path of the
    family's ControlNet class that fits it. Returns its text-to-image family, the family's options and the training
    noise scheduler."""
    name = args.pretrained_model_name_or_path
    family = detect_family(name, CONTROLNET_BASES, SCRIPT, args.revision, args.cache_dir)
    options = family.options(args)  # the family's own flags (SDXL's crop ids, SD3's T5 length); another's refused
    _, denoiser_config = family.latent_configs(name, args.revision, args.cache_dir)
    try:
        scheduler = family.scheduler_class.from_pretrained(name, subfolder="scheduler", revision=args.revision,
                                                           cache_dir=args.cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {family.description} from {name!r}: {str(e).strip().splitlines()[0]}") from e
    if scheduler.config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise UserError(f"the pipeline's scheduler predicts {scheduler.config['prediction_type']!r}; ControlNet "
                        "training supports epsilon and v_prediction (and flow matching)")
    family.check_resolution(name, args.resolution, args.revision, args.cache_dir)
    if args.controlnet_model_name_or_path:
        wanted = family.controlnet_class_name
        try:
            control_config = family.controlnet_class().load_config(args.controlnet_model_name_or_path,
                                                                   cache_dir=args.cache_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a {wanted} from {args.controlnet_model_name_or_path!r}: "
                            f"{str(e).strip().splitlines()[0]}") from e
        if control_config.get("_class_name") != wanted:
            raise UserError(f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path} holds a "
                            f"{control_config.get('_class_name')}, not a {wanted} ({family.description}'s)")
        mismatch = family.check_controlnet_config(control_config, denoiser_config)
        if mismatch:
            raise UserError(f"--controlnet_model_name_or_path does not match the {family.model_class}: {mismatch}")
    elif (refusal := family.controlnet_refusal(denoiser_config)) is not None:
        raise UserError(f"cannot make a new ControlNet for {name}: {refusal}")
    if args.tokenizer_name and looks_local(args.tokenizer_name) and not os.path.isdir(args.tokenizer_name):
        raise UserError(f"--tokenizer_name {args.tokenizer_name} does not exist")
    check_variant(name, args.variant)
    check_vae(args.pretrained_vae_model_name_or_path, args.cache_dir)
    return family, options, scheduler


def load_rows(args, name, split, config_name=None):
    """A dataset of (image, control, caption) rows with its columns checked, in one line each."""
    ds = load_image_dataset(name, split, config_name, args.cache_dir)
    columns = ", ".join(ds.column_names)
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in ds.column_names:
            raise DatasetError(f"dataset {name} has no column {column!r} ({flag}); its columns: {columns}")
    if not isinstance(ds.features[args.image_column], datasets.Image):
        raise DatasetError(f"column {args.image_column!r} of {name} holds {ds.features[args.image_column]}, not images")
    control = ds.features.get(args.conditioning_image_column)
    if control is None and not args.annotate_dataset:
        raise DatasetError(f"dataset {name} has no control column {args.conditioning_image_column!r} "
                           f"(--conditioning_image_column); its columns: {columns}. Pass --annotate_dataset to "
                           f"compute it with the {args.condition} annotator")
    if control is not None and not isinstance(control, datasets.Image) and not args.annotate_dataset:
        raise DatasetError(
            f"control column {args.conditioning_image_column!r} of {name} holds {control}, not images. In an image "
            'folder, metadata.jsonl rows look like {"file_name": "0001.png", "conditioning_image_file_name": '
            '"0001_canny.png", "text": "a caption"} (the *_file_name columns load as images)')
    captions = ds.features[args.caption_column]
    if not (getattr(captions, "dtype", None) == "string"
            or getattr(getattr(captions, "feature", None), "dtype", None) == "string"):
        raise DatasetError(f"caption column {args.caption_column!r} of {name} holds {captions}, not strings or lists "
                           "of strings")
    check_captions(ds, args.caption_column, name)
    return ds


def same_aspect(i, images, where):
    """Refuse a control whose aspect ratio differs from its image's: the shared resize and crop would then
    misalign them (a `check_images` row check: image and control are decoded in one pass)."""
    (w1, h1), (w2, h2) = (im.size for im in images)
    if abs(w1 * h2 - w2 * h1) > max(w1, h1, w2, h2):  # more than a pixel's rounding apart
        raise DatasetError(f"image {where} is {w1}x{h1} but its control is {w2}x{h2}: different aspect ratios")


def annotate(ds, args, annotator):
    """Add (or replace) the control column with the run's annotator, cached by datasets per annotator setting."""
    from datasets.fingerprint import Hasher

    def add(batch):
        return {args.conditioning_image_column: [annotator(img.convert("RGB")) for img in batch[args.image_column]]}

    features = ds.features.copy()
    features[args.conditioning_image_column] = datasets.Image()
    return ds.map(add, batched=True, batch_size=16, features=features, desc=f"annotating ({args.condition})",
                  new_fingerprint=Hasher.hash([ds._fingerprint, annotator.settings, args.conditioning_image_column]))


@torch.no_grad()
def generate(make_pipeline, controlnet, prompts, controls, seeds, args, device, text):
    """Images of a ControlNet pipeline (`make_pipeline(controlnet)`: DDIM, SD3 and Flux their flow-matching Euler
    sampler; --validation_inference_steps), one seed per image; `text`: the base's text-to-image family (how its
    pipeline takes the control, its guidance default, its pipeline arguments)."""
    pipe = make_pipeline(controlnet)
    denoiser = getattr(pipe, text.model_key)
    if controlnet.dtype != denoiser.dtype:  # mixed precision: the frozen denoiser is in bf16/fp16, and the pipeline
        pipe = make_pipeline(copy.deepcopy(controlnet).to(denoiser.dtype))  # adds their outputs
    pipe.set_progress_bar_config(disable=True)
    guidance = text.validation_guidance_scale if args.validation_guidance_scale is None \
        else args.validation_guidance_scale
    images = []
    # SD3's and Flux's ControlNet pipelines draw the control's VAE latents from torch's global generator: fixed
    # here, so an evaluation does not depend on what ran before it (a resumed run scores as an uninterrupted one)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seeds[0] if seeds else 0)
        for i in range(0, len(prompts), args.validation_batch_size):  # each image keeps its own seed in any batch
            chunk = slice(i, i + args.validation_batch_size)
            images += pipe(prompts[chunk], height=args.resolution, width=args.resolution,
                           num_inference_steps=args.validation_inference_steps, guidance_scale=guidance,
                           generator=seeded_generators(seeds[chunk], device), output_type="pil",
                           **{text.controlnet_image_arg: controls[chunk]}, **text.pipeline_kwargs).images
    return images


def evaluate_fidelity(accelerator, pipeline_parts, controlnet, rows, annotator, family, args):
    """Mean control fidelity over the held-out rows, sharded over the processes (every process must call it).
    Row i always uses seed + i, so every evaluation sees the same noise. Returns the mean score and, on every
    process, the first rows' (control, sample) pairs for a picture."""
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    controls = [family.fit_control(rows[i]["control"]) for i in mine]
    images = generate(pipeline_parts, controlnet, [rows[i]["caption"] for i in mine], controls,
                      [args.seed + i for i in mine], args, accelerator.device, family.text)
    scores = [(i, fidelity_score(args.condition, rows[i]["reference"], annotator.measure(img),
                                 args.fidelity_blur_sigma), controls[k], img)
              for k, (i, img) in enumerate(zip(mine, images))]
    gathered = sorted(gather_object(scores) if accelerator.num_processes > 1 else scores, key=lambda s: s[0])
    return float(np.mean([s[1] for s in gathered])), [(s[2], s[3]) for s in gathered[:args.num_validation_images]]


def pair_grid(pairs, cols=8, min_tile=128) -> Image.Image:
    """Controls above their samples: two rows per group of `cols` pairs; small images are upscaled (nearest
    neighbour) to at least `min_tile` pixels so that a person can see them."""
    size = tuple(x * max(1, -(-min_tile // x)) for x in pairs[0][1].size)
    cols = min(cols, len(pairs))
    rows = -(-len(pairs) // cols)
    grid = Image.new("RGB", (cols * size[0], 2 * rows * size[1]))
    for k, (control, image) in enumerate(pairs):
        x, y = (k % cols) * size[0], (k // cols) * 2 * size[1]
        grid.paste(control.convert("RGB").resize(size, Image.NEAREST), (x, y))
        grid.paste(image.resize(size, Image.NEAREST), (x, y + size[1]))
    return grid


def held_out_rows(ds, args, annotator, family):
    """The tracker's rows: caption (the first of a list), control, the real image, and the reference map."""
    rows = []
    for row in ds:
        caption = row[args.caption_column]
        caption = caption[0] if isinstance(caption, list) else caption
        image = family.fit_image(row[args.image_column])
        control = row[args.conditioning_image_column].convert("RGB")
        rows.append({"caption": caption, "control": control, "reference": reference_map(
            annotator, image, family.fit_control(control), args.condition)})
    return rows


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = training.make_accelerator(args, args.output_dir, logging_dir)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.push_to_hub:
        hub.check_hub_access(args.hub_token)  # not after 15K steps
    annotator = annotator_of(args, accelerator.device)
    threshold = check_threshold(args.condition, args.convergence_threshold)

    # ---- Configs and data: everything cheap is checked before any weights load.
    base_family, family_options, noise_scheduler = check_pipeline(args)
    ds = load_rows(args, args.dataset, args.train_split, args.dataset_config_name)
    if args.max_train_samples is not None:
        ds = ds.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(ds))))
    if args.validation_dataset:
        val = load_rows(args, args.validation_dataset, args.validation_split)
        val = val.select(range(min(args.num_validation_samples, len(val))))
    else:  # a seeded hold-out, never trained on
        if len(ds) <= args.num_validation_samples:
            raise DatasetError(f"dataset has {len(ds)} rows, too few to hold out --num_validation_samples "
                               f"{args.num_validation_samples} for the tracker; lower it or pass --validation_dataset")
        split = ds.train_test_split(test_size=args.num_validation_samples, seed=args.seed, shuffle=True)
        ds, val = split["train"], split["test"]
    diff_tuning = DiffTuning.from_args(args, noise_scheduler, condition_dropout=args.proportion_empty_prompts)
    n_data = diff_tuning.n_data
    if len(ds) < n_data * accelerator.num_processes:
        raise DatasetError(f"dataset has {len(ds)} training rows, fewer than one batch of {n_data} downstream rows on "
                           f"each of {accelerator.num_processes} process(es); lower --train_batch_size")
    if not args.skip_image_check and not args.annotate_dataset:
        bar = lambda it, total: tqdm(it, total=total, desc="checking images and controls",  # noqa: E731
                                     disable=not accelerator.is_local_main_process)
        with accelerator.main_process_first():
            for part in (ds, val):
                check_images(part, [args.image_column, args.conditioning_image_column], bar, same_aspect)
    bank_plan = ControlNetOnSD.bank_plan(args.pretrained_model_name_or_path, BankSettings(
        args.memory_bank_guidance_scale, args.memory_bank_inference_steps, args.resolution, [args.memory_bank_prompt],
        annotator, args.pretrained_vae_model_name_or_path), {"text_family": base_family})
    diff_tuning.check_bank(bank_plan.record, args.memory_bank_size, accelerator.num_processes)
    identity = run_identity(args, IDENTITY_FLAGS, SCRIPT, base_family.name)
    check_resume(args.output_dir, args.resume_from_checkpoint, identity, logger)
    if accelerator.is_main_process:
        mark(args.output_dir, SCRIPT)  # from here on this script writes into it
    if args.annotate_dataset:
        with accelerator.main_process_first():
            ds, val = annotate(ds, args, annotator), annotate(val, args, annotator)

    # ---- Models: only the ControlNet trains; the UNet, VAE and text encoders stay frozen.
    vae = {}
    if args.pretrained_vae_model_name_or_path:
        vae = {"vae": AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)}
    pipeline = base_family.load(args.pretrained_model_name_or_path, args.revision, args.cache_dir,
                                variant=args.variant, **vae)
    if args.tokenizer_name:
        from transformers import AutoTokenizer

        pipeline.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    dtype = training.weight_dtype(accelerator)
    text = base_family(pipeline, accelerator.device, dtype, **family_options)  # freezes the VAE and text encoders
    if args.controlnet_model_name_or_path:
        controlnet = base_family.controlnet_class().from_pretrained(args.controlnet_model_name_or_path,
                                                                    cache_dir=args.cache_dir)
    else:  # copied from the base's weights, as the family's diffusers example copies them
        controlnet = text.new_controlnet()
    unet = training.freeze(text.denoiser, accelerator.device, dtype)  # the frozen UNet (SD3, Flux: transformer)
    controlnet.to(accelerator.device).train()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()

    family = ControlNetOnSD(text, noise_scheduler, unet, args.memory_bank_prompt, accelerator.autocast, dtype,
                            args.resolution, args.condition, args.image_interpolation_mode)

    # ---- Memory bank (generated once, by all processes, with the pre-trained weights).
    with accelerator.autocast():
        bank = diff_tuning.open_bank(accelerator, bank_plan.sampler(pipeline), args.memory_bank_batch_size, args.seed)

    # ---- Data loaders and optimisation.
    workers = worker_options(args.dataloader_num_workers)
    rows = ds.with_transform(family.transform(args.image_column, args.conditioning_image_column, args.caption_column))
    loader = torch.utils.data.DataLoader(rows, batch_size=n_data, shuffle=True, drop_last=True,
                                         collate_fn=family.collate, **workers)
    bank_loader = diff_tuning.bank_loader(family, workers)
    length = training.run_length(args, len(loader), accelerator.num_processes)  # max steps or epochs
    learning_rate = training.effective_learning_rate(args, accelerator.num_processes)
    optimizer_class = None
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    optimizer, lr_scheduler = training.make_optimizer(controlnet.parameters(), args, accelerator, learning_rate,
                                                      length.max_train_steps, optimizer_class)
    ema = training.make_ema(controlnet, args.ema_decay, accelerator) if args.use_ema else None
    controlnet, optimizer, lr_scheduler, loader = accelerator.prepare(controlnet, optimizer, lr_scheduler, loader)
    if bank_loader is not None:
        bank_loader = accelerator.prepare(bank_loader)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=training.tracker_config(args))

    # ---- Resume: the weights, the data order, and the fidelity curve up to the checkpoint.
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint, logger, ema, identity)
    micro_step = global_step * args.gradient_accumulation_steps
    data_iter = ResumableLoader(loader, accelerator, micro_step)
    bank_iter = ResumableLoader(bank_loader, accelerator, micro_step) if bank_loader is not None else None
    tracker = ConvergenceTracker(args.condition, threshold, args.convergence_patience,
                                 os.path.join(args.output_dir, CONVERGENCE_FILE) if accelerator.is_main_process
                                 else None)
    tracker.resume(global_step)
    rows = held_out_rows(val, args, annotator, family)
    ddim = base_family.sampling_scheduler(pipeline)

    def parts(model):  # the frozen base pipeline with this ControlNet, for the tracker and grids
        return base_family.controlnet_sampler(pipeline, model, ddim)

    def track(step):
        """Score the control fidelity (EMA weights when --use_ema) and log the curve; returns the pairs."""
        unwrapped = accelerator.unwrap_model(controlnet, keep_fp32_wrapper=False)  # outputs in the model's dtype
        with training.averaged_weights(unwrapped, ema) as model, accelerator.autocast():
            score, pairs = evaluate_fidelity(accelerator, parts, model, rows, annotator, family, args)
            extra = extra_grids(parts, model, family, args, accelerator.device) if accelerator.is_main_process else None
        if accelerator.is_main_process:
            tracker.add(step, score)
            accelerator.log({f"fidelity/{tracker.metric}": score}, step=step)
            training.log_images(accelerator, "validation", np.asarray(pair_grid(pairs))[None] / 255.0, step)
            if extra is not None:  # --validation_prompt / --validation_image grids, during training too
                training.log_images(accelerator, "validation_prompts", np.asarray(extra)[None] / 255.0, step)
            logger.info(f"step {step}: {tracker.metric} {score:.4f} (threshold {threshold:g}, "
                        f"{tracker.direction_word}); converged at {tracker.converged_at}")
        return pairs

    training.log_running_training(
        logger, examples=len(ds), batch_size=diff_tuning.n_bank + n_data, num_processes=accelerator.num_processes,
        accumulation=args.gradient_accumulation_steps, length=length, first_step=global_step,
        held_out_rows=len(rows), data_rows_per_micro_batch=n_data,
        memory_bank_rows_per_micro_batch=diff_tuning.n_bank,
        memory_bank=f"{len(bank)} rows" if bank is not None else "none")
    if (args.validation_steps and global_step % args.validation_steps == 0
            and not any(p["step"] == global_step for p in tracker.points)):
        track(global_step)  # step 0 (the untrained ControlNet), or a due evaluation a kill interrupted
        if global_step == 0 and tracker.passed_before_training and accelerator.is_main_process:
            logger.warning(f"the untrained ControlNet already scores {tracker.points[0]['score']:.4f}, past "
                           f"--convergence_threshold {threshold:g}: the convergence step will say nothing; choose a "
                           "threshold the untrained model does not reach (recorded in convergence.json)")
    logs = {}
    progress = tqdm(range(length.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    while global_step < length.max_train_steps:
        generator = step_generator(args.seed, accelerator.process_index, micro_step, accelerator.device)
        micro_step += 1
        with accelerator.accumulate(controlnet):
            loss, loss_parts = diff_tuning(family, controlnet, next(data_iter), next(bank_iter) if bank_iter else None,
                                           generator)
            training.apply_gradients(
                accelerator, controlnet, loss, optimizer, lr_scheduler, args.max_grad_norm,
                step=global_step + 1, output_dir=args.output_dir, set_to_none=args.set_grads_to_none)

        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = {"loss": loss.detach().item(), **{k: v.detach().item() for k, v in loss_parts.items()},
                "lr": lr_scheduler.get_last_lr()[0]}
        if ema is not None:
            ema.step(controlnet.parameters())
        training.log_step(accelerator, progress, logs, global_step)
        if global_step % length.checkpointing_steps == 0:  # each checkpoint also holds a loadable controlnet/ folder
            training.checkpoint(
                accelerator, controlnet, global_step, args.output_dir, args.checkpoints_total_limit,
                identity, logger, save_extra=lambda folder: accelerator.unwrap_model(
                controlnet, keep_fp32_wrapper=False).save_pretrained(os.path.join(folder, "controlnet")))
        if args.validation_steps and global_step % args.validation_steps == 0:
            track(global_step)
            if args.stop_at_convergence and tracker.converged_at is not None:
                logger.info(f"the control was learned at step {tracker.converged_at}; stopping (--stop_at_convergence)")
                break
    progress.close()

    # ---- Save a stock ControlNetModel, samples (controls above samples), the curve and a model card.
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(controlnet, keep_fp32_wrapper=False)
    if ema is not None:
        ema.copy_to(model.parameters())
    # nothing non-finite is saved or pushed
    training.check_finite_weights(accelerator, model, global_step, args.output_dir)
    model.eval()
    with accelerator.autocast():
        score, pairs = evaluate_fidelity(accelerator, parts, model, rows, annotator, family, args)
        extra = extra_grids(parts, model, family, args, accelerator.device) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        if args.validation_steps and not any(p["step"] == global_step for p in tracker.points):
            tracker.add(global_step, score)
        model.save_pretrained(args.output_dir)
        pair_grid(pairs).save(os.path.join(args.output_dir, "samples.png"))
        if extra is not None:
            extra.save(os.path.join(args.output_dir, "validation_prompts.png"))
        if tracker.points:
            tracker.plot(os.path.join(args.output_dir, "convergence.png"), f"{args.method}, {args.condition}")
        repo = hub.hub_repo_id(args.hub_model_id, args.output_dir, args.push_to_hub, args.hub_token)
        write_card(args, tracker, score, logs, accelerator.mixed_precision, learning_rate, diff_tuning,
                   annotator.settings, global_step, base_family, repo)
        if args.push_to_hub:
            diff_tuning.push(args.output_dir, repo, args.hub_token, args.hub_private_repo, logger)
    # The DDP wrapper must go before the process group ends (utils.infra.training.end_training).
    controlnet = optimizer = lr_scheduler = loader = bank_loader = None  # noqa: F841
    training.end_training(accelerator)
    return model


def extra_grids(parts, controlnet, family, args, device):
    """--validation_prompt / --validation_image: --num_validation_images samples per pair, controls above."""
    if not args.validation_prompt:
        return None
    prompts, images = args.validation_prompt, args.validation_image
    n = max(len(prompts), len(images))
    prompts, images = (prompts * n)[:n], (images * n)[:n]
    pairs = []
    for prompt, path in zip(prompts, images):
        control = family.fit_control(Image.open(path))
        k = args.num_validation_images
        samples = generate(parts, controlnet, [prompt] * k, [control] * k, [args.seed + i for i in range(k)], args,
                           device, family.text)
        pairs += [(control, s) for s in samples]
    return pair_grid(pairs, cols=args.num_validation_images)



def write_card(args, tracker, final_score, last_logs, mixed_precision, learning_rate, diff_tuning,
               annotator_settings, steps, base_family, repo):
    """`diff_tuning`: the method (its card text, fields and tag); `steps`: the optimizer steps trained;
    `base_family`: the base pipeline's text-to-image family."""
    method = "Diff-Tuning" if args.method == "diff_tuning" else "standard ControlNet training"
    metric, higher, _ = METRICS[args.condition]
    hyper = {"method": args.method, "condition": args.condition, "annotator": str(annotator_settings),
             "steps": steps, "train_batch_size": args.train_batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": learning_rate,
             "lr_scheduler": args.lr_scheduler, "resolution": args.resolution,
             "proportion_empty_prompts": args.proportion_empty_prompts, "use_ema": args.use_ema,
             "mixed_precision": mixed_precision, "seed": args.seed}
    hyper.update(diff_tuning.card_fields())
    converged = tracker.converged_at
    metrics = {f"control fidelity ({metric}, {'higher' if higher else 'lower'} is better), final":
               f"{final_score:.4f} on {args.num_validation_samples} held-out rows"}
    if tracker.points:
        metrics["sudden convergence step"] = (
            f"{converged} (first of {args.convergence_patience} evaluation(s) past {tracker.threshold:g})"
            if converged is not None else f"not reached in {tracker.points[-1]['step']} steps "
                                          f"(threshold {tracker.threshold:g})")
    pipeline_class, controlnet_class = base_family.controlnet_pipeline, base_family.controlnet_class_name
    usage = f'''import torch
from diffusers import {controlnet_class}, {pipeline_class}
from diffusers.utils import load_image

controlnet = {controlnet_class}.from_pretrained("{repo}")
pipe = {pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}", controlnet=controlnet)
control = load_image("<a {args.condition} control image>")
image = pipe("a prompt", {base_family.controlnet_image_arg}=control, num_inference_steps=50,
             generator=torch.manual_seed(0)).images[0]'''
    description = (
        f"A ControlNet for `{args.condition}` controls on `{args.pretrained_model_name_or_path}`, trained on "
        f"`{args.dataset}` with {method}. "
        + diff_tuning.card_text("samples of the pre-trained model (with their own annotated controls)")
        + " `samples.png` shows held-out controls above the samples they produced; `convergence.png` the control "
          "fidelity along training (the \"sudden convergence\" of ControlNet).")
    hub.save_training_card(
        args.output_dir, title=f"ControlNet ({args.condition}) for {args.pretrained_model_name_or_path}: {method}",
        base_model=args.pretrained_model_name_or_path, dataset=args.dataset, last_logs=last_logs, metrics=metrics,
        tags=["controlnet", base_family.tag, *base_family.hub_tags, args.condition, diff_tuning.tag],
        description=description, hyperparameters=hyper, usage=usage)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
