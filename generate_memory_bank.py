#!/usr/bin/env python
"""Generate a Diff-Tuning memory bank ahead of training, for any supported model family.

A memory bank holds samples of the pre-trained model (Diff-Tuning's retention data). The training scripts build one
before their first step when `--memory_bank` names no finished bank; for a large bank (the paper's 5,000 samples at
256-512 px take hours) build it once here, on as many processes as you have, and reuse it across runs:

    accelerate launch generate_memory_bank.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --output_dir banks/dit-xl-5k --size 5000                # DiT: random classes, CFG 1.5, 50 DDIM steps
    accelerate launch generate_memory_bank.py --pretrained_model_name_or_path stable-diffusion-v1-5/... \\
        --output_dir banks/sd15-canny --resolution 512 --condition canny   # ControlNet: the paper's prompt, Canny

then `train_diff_tuning_dit.py --memory_bank banks/dit-xl-5k ...` (or the ControlNet script with the same
`--resolution`, `--condition`, annotator flags and `--memory_bank_prompt`). The family comes from the pipeline folder:
a DiTPipeline samples classes; a text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux) samples
`--prompt` (with `--condition`, each sample gets its control annotated, as the ControlNet script trains on; SD3 and
Flux take `--max_sequence_length`, and Flux's `--guidance_scale` is its guidance embedding). Generation is sharded
and resumable: run the same command again after an interruption.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import sys

import torch

from utils.families.base import BankSettings
from utils.families.controlnet import ControlNetOnSD
from utils.families.registry import MEMORY_BANKS, detect_family
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.training import HelpFormatter, precision_dtype
from utils.methods.memory_bank import bank_prompts_from_file, build_memory_bank, check_memory_bank
from utils.metrics.annotators import add_annotator_args, annotator_of

DEFAULT_PROMPT = "a high-quality, detailed, and professional image"  # the paper's ControlNet bank prompt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="DiTPipeline, or Stable Diffusion 1.x/2.x, XL or 3 pipeline: Hub id or folder.")
    p.add_argument("--revision", default=None, help="Revision of the pipeline on the Hub.")
    p.add_argument("--output_dir", required=True, help="Folder of the finished bank (a save_to_disk dataset).")
    p.add_argument("--size", type=int, default=5000, help="Number of samples (the paper's smallest bank).")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="CFG scale (default: 1.5 for DiT, the official sampler's; 7.5 for Stable Diffusion).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps.")
    p.add_argument("--batch_size", type=int, default=None,
                   help="Samples per generation batch and shard (default: 32 for DiT, 8 for Stable Diffusion).")
    p.add_argument("--seed", type=int, default=0, help="Sample i uses seed + i.")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="Sampling dtype.")
    g = p.add_argument_group("Stable Diffusion banks")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="Prompt of the bank samples (ControlNet banks).")
    g.add_argument("--resolution", type=int, default=512, help="Sample size in pixels (the training resolution).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3: T5 tokens per prompt (default: 77; the training script's --max_sequence_length).")
    g.add_argument("--no_controls", action="store_true",
                   help="A text-to-image bank: no control annotated (the default annotates with --condition).")
    g.add_argument("--prompts_file", default=None,
                   help="A text-to-image bank (implies --no_controls): prompts, one a line, sample i from prompt "
                        "i mod P (train_diff_tuning_text_to_image.py --memory_bank_prompts takes the same file).")
    add_annotator_args(p)
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    for name in ("size", "num_inference_steps", "resolution"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise UserError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    return args


def bank_plan(args):
    """(family, its bank plan): from the configs alone, before any weights. A text-to-image pipeline makes a
    ControlNet bank (its samples annotated with --condition) unless --no_controls or --prompts_file asks for a
    text-to-image one."""
    name = args.pretrained_model_name_or_path
    family = detect_family(name, MEMORY_BANKS, "generate_memory_bank.py", args.revision)
    options = family.options(args)  # the family's own flags (SD3's T5 length); another family's refused
    controls = family.needs_captions and not (args.no_controls or args.prompts_file)
    prompts = bank_prompts_from_file(args.prompts_file) if args.prompts_file else [args.prompt]
    settings = BankSettings(args.guidance_scale, args.num_inference_steps, args.resolution, prompts,
                            annotator_of(args) if controls else None, revision=args.revision)
    if controls:  # the ControlNet family on this base pipeline
        return family, ControlNetOnSD.bank_plan(name, settings, {"text_family": family})
    return family, family.bank_plan(name, settings, options)


def main(args):
    from accelerate import Accelerator

    family, plan = bank_plan(args)
    # A finished bank is reused only if it was made for this model and these settings.
    check_memory_bank(args.output_dir, plan.record, flag="--output_dir")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    dtype = precision_dtype(args.mixed_precision)
    pipeline = family.load(args.pretrained_model_name_or_path, args.revision, dtype=dtype)
    pipeline.to(accelerator.device)
    batch_size = args.batch_size or family.bank_batch_size
    bank = build_memory_bank(accelerator, plan.sampler(pipeline), args.output_dir, args.size, plan.record,
                             batch_size, args.seed)
    accelerator.print(f"memory bank {args.output_dir}: {len(bank)} samples")
    return bank


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
