#!/usr/bin/env python
"""DeMe: fine-tune N copies of a diffusion UNet, copy i on timestep range i, to merge them into one model later.

"Decouple-Then-Merge: Finetune Diffusion Models as Multi-Task Learning" (Ma et al., 2025): gradients of distant
timesteps conflict, so each copy trains on one of N equal ranges of [0, T) (with probability p on all of [0, T)),
stays close to the pre-trained model through a consistency loss, and gets identity-initialised channel projections.
`merge_timestep_models.py` then merges the copies in parameter space: one model, no extra inference cost.

    accelerate launch train_deme.py --pretrained_model_name_or_path google/ddpm-cifar10-32 --dataset <...> \\
        --output_dir out --num_ranges 4 [--range_index 2]

Models: DDPM/DDIM pipelines (`UNet2DModel`), Stable Diffusion 1.x/2.x and XL (`UNet2DConditionModel`), SD3 and Flux
(their transformers; frozen VAE and text encoders, `--caption_column`). Under flow matching (SD3, Flux) the ranges cut
the scheduler's discrete sigmas, counted from the data side as DDPM's t is: range 0 holds the smallest sigmas
(docs/deme.md); SD3 trains its example's preconditioned objective, Flux the flow target. Output: `out/range_{i}/`, a
stock diffusers UNet (transformer) folder with a model card per range, and `out/deme_manifest.json`. Defaults are the
paper's DDPM CIFAR-10 setup.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import copy
import gc
import logging
import os
import sys

import datasets
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from utils.families.registry import DEME, detect_family
from utils.infra import hub, training
from utils.infra.checkpointing import resume, run_identity, step_generator
from utils.infra.data import ResumableLoader, check_images, load_image_dataset, require_column, worker_options
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.outputs import check_output_dir, mark
from utils.methods.channel_projection import (
    PLACEMENTS,
    add_projections,
    fold_projections,
    save_official_projections,
    split_official_projections,
)
from utils.methods.deme import (
    GLOBAL_SAMPLE_MODES,
    DeMeLoss,
    RangeTimestepSampler,
    is_finished,
    range_dir,
    timestep_ranges,
    write_manifest,
    write_range_record,
)

logger = get_logger(__name__)
SCRIPT = "train_deme.py"  # marks the output folders it writes (utils.infra.outputs)
# the flags that decide which weights a checkpoint holds: a resume with others is refused
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "revision", "num_ranges", "channel_projection")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=training.HelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="DDPM/DDIM (UNet2DModel) or Stable Diffusion pipeline: Hub id or folder.")
    g.add_argument("--revision", default=None, help="Revision of the pre-trained pipeline on the Hub.")
    g.add_argument("--dataset", required=True, help="Hub id, image folder (with metadata.jsonl for captions) or "
                   "save_to_disk folder.")
    g.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    g.add_argument("--train_split", default="train", help="Split to train on.")
    g.add_argument("--image_column", default=None, help="Image column (default: the only Image column, or 'image').")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3 and Flux: T5 tokens per caption (default: 77 for SD3, 512 for Flux, as diffusers' "
                        "scripts).")
    g.add_argument("--caption_column", default=None,
                   help="Caption column, Stable Diffusion only (default: 'text' or 'caption').")
    g.add_argument("--cache_dir", default=None, help="Where downloaded datasets and models are cached.")
    g.add_argument("--output_dir", default="deme", help="Where range_{i}/ folders and the manifest go.")
    g.add_argument("--resolution", type=int, default=None, help="Training resolution (default: the model's).")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                   help="Random horizontal flips.")
    g.add_argument("--skip_image_check", action="store_true", help="Do not decode every image before training.")

    g = p.add_argument_group("DeMe")
    g.add_argument("--num_ranges", type=int, default=4, help="N: equal timestep ranges of [0, T), one copy each.")
    g.add_argument("--range_index", type=int, default=None,
                   help="Train only range i (run N jobs in parallel); default: all ranges in turn.")
    g.add_argument("--global_sample_prob", type=float, default=0.3,
                   help="p: probability that t comes from all of [0, T) instead of the range (CIFAR-10: 0.4).")
    g.add_argument("--global_sample_mode", choices=GLOBAL_SAMPLE_MODES, default="sample",
                   help="Decide range-or-global per sample (ours: every step mixes both), or per batch with mirrored "
                        "timesteps (official code). Both give each sample the same distribution.")
    g.add_argument("--consistency_weight", type=float, default=1.0,
                   help="Weight of the MSE to the frozen pre-trained model's prediction (0: off).")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Weight the denoising loss with Min-SNR-gamma (Hang et al., 2023; gamma = 5 there), as "
                        "diffusers' examples do: a baseline, not part of DeMe (default: unweighted, as the paper).")
    g.add_argument("--channel_projection", choices=PLACEMENTS, default=None,
                   help="foldable: identity-initialised C x C maps on conv outputs, folded into the convs on save "
                        "(a stock UNet, zero cost). official: maps after each down/mid/up block as the official "
                        "code; they cannot be folded, are saved in channel_projection.safetensors, which stock "
                        "from_pretrained ignores (utils.methods.channel_projection.attach_saved_projections "
                        "restores them). "
                        "none: no maps (default: foldable on UNets, none on SD3 and Flux transformers).")

    training.add_optimisation_args(
        p, batch_size=64, batch_help="Batch per device (CIFAR-10: 64; LSUN/SD: 16 x 4 accumulation).",
        max_train_steps=20000, learning_rate=2e-4, max_grad_norm=1.0, ema_decay=0.9999,
        paper="paper, per range: 20K; lr CIFAR-10 2e-4, LSUN/SD 5e-5")
    g = training.add_output_args(p, checkpointing_steps=2000, validation_steps=2000)
    g.add_argument("--validation_prompts", nargs="+", default=None,
                   help="Stable Diffusion validation prompts (default: the first captions of the data).")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    check_args(args)
    return args


def check_args(args):
    """Hyper-parameters that cannot work, caught before anything is loaded."""
    # finished: the range this job trains (N jobs with --range_index share one output folder), else any range
    ranges = f"range_{args.range_index}" if args.range_index is not None else "range_*"
    training.check_common_args(args, positive=("num_ranges",), finished=os.path.join(ranges, "README.md"))
    if args.range_index is not None and not 0 <= args.range_index < args.num_ranges:
        raise UserError(f"--range_index must be in 0..{args.num_ranges - 1} for --num_ranges {args.num_ranges}, "
                        f"got {args.range_index}")
    if not 0 <= args.global_sample_prob <= 1:
        raise UserError(f"--global_sample_prob must be in [0, 1], got {args.global_sample_prob}")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise UserError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.consistency_weight < 0:
        raise UserError(f"--consistency_weight must be >= 0, got {args.consistency_weight}")
    check_output_dir(args.output_dir, SCRIPT, [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                               ("--dataset", args.dataset)])


def main(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # The processes; each range then gets an Accelerator of its own. Like Accelerator, honour `accelerate launch
    # --cpu` (PartialState alone would not see the other CPU processes and every one would write the manifest).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    set_seed(args.seed)
    if args.push_to_hub:
        hub.check_hub_access(args.hub_token)  # not after N x 20K steps

    # ---- Data and model: load and check everything cheap first.
    ds = load_image_dataset(args.dataset, args.train_split, args.dataset_config_name, args.cache_dir)
    image_column = require_column(ds, args.image_column, datasets.Image, "image", "--image_column")
    family = detect_family(args.pretrained_model_name_or_path, DEME, "DeMe", args.revision, args.cache_dir)
    caption_column = None
    if family.needs_captions:
        caption_column = args.caption_column or next((c for c in ("text", "caption") if c in ds.column_names), None)
        if caption_column not in ds.column_names:
            raise UserError(f"a Stable Diffusion model needs captions: dataset has no caption column "
                            f"{caption_column or 'text/caption'!r} (columns: {', '.join(ds.column_names)}); "
                            "pass --caption_column")
    elif args.caption_column:
        raise UserError(f"--caption_column given, but {args.pretrained_model_name_or_path} is an unconditional "
                        "UNet2DModel pipeline")
    # the model's own size for a pixel UNet; a latent model takes a multiple of its VAE factor (x 2: SD3, Flux)
    resolution = family.check_resolution(args.pretrained_model_name_or_path, args.resolution, args.revision,
                                         args.cache_dir)
    placement = args.channel_projection or ("foldable" if family.channel_projections else "none")
    if placement != "none" and not family.channel_projections:
        raise UserError(f"--channel_projection {placement}: DeMe's channel maps go on UNet blocks; "
                        f"{family.description} has a transformer: leave it out (none)")
    options = family.options(args)  # its own flags (SD3's and Flux's T5 length); another family's are refused
    pipeline = family.load(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    if getattr(getattr(pipeline, family.model_key).config, "num_class_embeds", None):
        raise UserError("class-conditional UNet2DModel pipelines are not supported; DeMe here trains unconditional "
                        "DDPM and text-conditional UNets and transformers")
    if len(ds) < args.train_batch_size:
        raise UserError(f"dataset has {len(ds)} images, fewer than one batch of {args.train_batch_size}; "
                        "lower --train_batch_size")
    if not args.skip_image_check:
        check_images(ds, image_column, lambda it, total: tqdm(it, total=total, desc="checking images",
                                                              disable=not state.is_local_main_process))

    T = pipeline.scheduler.config.num_train_timesteps
    if args.num_ranges > T:
        raise UserError(f"--num_ranges {args.num_ranges} is more than the model's {T} timesteps")
    ranges = timestep_ranges(T, args.num_ranges)
    learning_rate = training.effective_learning_rate(args, state.num_processes)  # every range, resumed or not, the same
    if state.is_main_process:
        mark(args.output_dir, SCRIPT)
        write_manifest(args.output_dir, args.pretrained_model_name_or_path, family.model_class, T, placement, ranges)

    models = {}
    for index in [args.range_index] if args.range_index is not None else range(args.num_ranges):
        folder = range_dir(args.output_dir, index)
        if args.resume_from_checkpoint and is_finished(folder):
            logger.info(f"range {index} {ranges[index]} is finished; skipping it", main_process_only=True)
            continue
        models[index] = train_range(args, index, ranges[index], pipeline, family, ds, image_column,
                                    caption_column, resolution, learning_rate, placement, options)
    gc.collect()  # every range's DDP wrapper is gone before the group ends (see utils.infra.training.end_training)
    state.destroy_process_group()  # once, after the last range (each range's Accelerator shares the processes)
    return models


def train_range(args, index, time_range, pipeline, family, ds, image_column, caption_column, resolution,
                learning_rate, placement, options):
    """Fine-tune one copy on one timestep range and save it as a stock UNet (SD3, Flux: transformer) in
    range_{index}/; `placement`: of the channel projections (--channel_projection, or the family's default)."""
    out = range_dir(args.output_dir, index)
    accelerator = training.make_accelerator(args, out, os.path.join(out, args.logging_dir))
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    dtype = training.weight_dtype(accelerator)
    family = family(pipeline, accelerator.device, dtype, args.random_flip, **options)

    # the pipeline's denoiser stays the untouched fp32 pre-trained model for every range. A frozen copy in the
    # mixed-precision dtype gives the consistency targets; the trained copy is fp32 (autocast does the mixed precision).
    base = getattr(pipeline, family.model_key)
    frozen = training.freeze(copy.deepcopy(base), accelerator.device, dtype)
    unet = copy.deepcopy(base).requires_grad_(True).train()
    projections = add_projections(unet, placement)
    unet.to(accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        frozen.enable_xformers_memory_efficient_attention()
    total = sum(p.numel() for p in unet.parameters())
    extra = sum(p.numel() for p in projections)

    lo, hi = time_range
    T = family.scheduler.config.num_train_timesteps
    deme_loss = DeMeLoss(RangeTimestepSampler(T, lo, hi, args.global_sample_prob, args.global_sample_mode),
                         args.consistency_weight, args.snr_gamma, dtype)

    rows = ds.with_transform(family.transform(image_column, caption_column, resolution))
    loader = torch.utils.data.DataLoader(rows, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
                                         collate_fn=family.collate, **worker_options(args.dataloader_num_workers))
    length = training.run_length(args, len(loader), accelerator.num_processes)  # max steps or epochs
    optimizer, lr_scheduler = training.make_optimizer(unet.parameters(), args, accelerator, learning_rate,
                                                      length.max_train_steps)
    ema = training.make_ema(unet, args.ema_decay, accelerator) if args.use_ema else None
    unet, optimizer, lr_scheduler, loader = accelerator.prepare(unet, optimizer, lr_scheduler, loader)
    if accelerator.is_main_process:
        accelerator.init_trackers("deme", config={**training.tracker_config(args), "range_index": index, "range_lo": lo,
                                                  "range_hi": hi})

    identity = run_identity(args, IDENTITY_FLAGS, SCRIPT, family.name)
    global_step = resume(accelerator, out, args.resume_from_checkpoint, logger, ema, identity)
    micro_step = global_step * args.gradient_accumulation_steps
    data_iter = ResumableLoader(loader, accelerator, micro_step)
    prompts = None
    if caption_column:
        first = ds.select_columns([caption_column])[: args.num_validation_images][caption_column]
        prompts = args.validation_prompts or [c[0] if isinstance(c, list) else c for c in first]
    logger.info(f"range {index}: t in [{lo}, {hi}) with probability {1 - args.global_sample_prob:g}, else [0, {T}); "
                f"{total:,} parameters, {extra:,} in channel projections ({placement}); "
                f"steps {global_step} -> {length.max_train_steps}")
    logs = {}
    progress = tqdm(range(length.max_train_steps), initial=global_step, desc=f"range {index}",
                    disable=not accelerator.is_local_main_process)

    while global_step < length.max_train_steps:
        generator = step_generator(args.seed, accelerator.process_index, micro_step, accelerator.device)
        micro_step += 1
        with accelerator.accumulate(unet), accelerator.autocast():
            loss, parts = deme_loss(family, unet, frozen, next(data_iter), generator)
            training.apply_gradients(accelerator, unet, loss, optimizer, lr_scheduler, args.max_grad_norm,
                                     step=global_step + 1, output_dir=out)

        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = {"loss": loss.detach().item(), **{k: v.detach().item() for k, v in parts.items()},
                "lr": lr_scheduler.get_last_lr()[0]}
        if ema is not None:
            ema.step(unet.parameters())
        training.log_step(accelerator, progress, logs, global_step)
        if global_step % length.checkpointing_steps == 0:
            training.checkpoint(accelerator, unet, global_step, out, args.checkpoints_total_limit, identity, logger)
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            with training.averaged_weights(accelerator.unwrap_model(unet), ema) as model, accelerator.autocast():
                images = family.sample(model, args.num_validation_images, args.validation_inference_steps,
                                       args.seed, prompts, resolution)
            training.log_images(accelerator, "validation", images, global_step)
    progress.close()

    # ---- Save a stock UNet (projections folded in, or beside it for the official placement) and a card.
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(unet)  # every process returns the same final model; the main one writes it
    if ema is not None:
        ema.copy_to(model.parameters())
    training.check_finite_weights(accelerator, model, global_step, out)  # nothing non-finite is saved or pushed
    model.eval()
    if accelerator.is_main_process:
        with accelerator.autocast():
            images = family.sample(model, args.num_validation_images, args.validation_inference_steps, args.seed,
                                   prompts, resolution)
        training.log_images(accelerator, "final", images, global_step)
    if placement == "foldable":
        fold_projections(model)
    official_maps = split_official_projections(model) if placement == "official" else None
    if accelerator.is_main_process:
        model.save_pretrained(out)
        if official_maps:
            save_official_projections(official_maps, out)
        training.image_grid(images).save(os.path.join(out, "samples.png"))
        write_range_record(out, index, args.num_ranges, time_range, T, args.pretrained_model_name_or_path,
                           placement)
        write_card(args, out, index, time_range, T, family, total, extra, logs, accelerator.mixed_precision,
                   learning_rate, global_step, placement)
        if args.push_to_hub:
            repo = hub.push_folder(out, f"{hub.hub_repo_id(args.hub_model_id, args.output_dir, True, args.hub_token)}"
                                   f"-range-{index}", args.hub_token, args.hub_private_repo)
            logger.info(f"pushed range {index} to https://huggingface.co/{repo}")
    for tracker in accelerator.trackers:  # not end_training(): it would end the process group the next range needs
        tracker.finish()
    del unet, optimizer, lr_scheduler, loader  # the DDP wrapper goes while the group is alive (utils.infra.training)
    accelerator.free_memory()
    return model



def write_card(args, out, index, time_range, T, family, total, extra, last_logs, mixed_precision, learning_rate,
               steps, placement):
    """`mixed_precision`: the effective one (also when accelerate's config set it); `learning_rate` after
    --scale_lr; `steps`: the optimizer steps trained."""
    lo, hi = time_range
    hyper = {"range_index": f"{index} of {args.num_ranges}", "timesteps": f"[{lo}, {hi}) of [0, {T})",
             "global_sample_prob": args.global_sample_prob, "global_sample_mode": args.global_sample_mode,
             "consistency_weight": args.consistency_weight, "snr_gamma": args.snr_gamma,
             "channel_projection": placement,
             "channel_projection_parameters": f"{extra:,} ({100 * extra / total:.2f}% of {total:,}; "
                                              + ("folded into the convs" if placement == "foldable"
                                                 else "not folded") + ")",
             "steps": steps, "train_batch_size": args.train_batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps, "learning_rate": learning_rate,
             "lr_scheduler": args.lr_scheduler, "use_ema": args.use_ema, "mixed_precision": mixed_precision,
             "seed": args.seed}
    model_class, pipe_class, call = family.model_class, family.pipeline_class, family.example_call
    # pushed: <repo>-range-<i>; else the range's folder
    repo = f"{hub.hub_repo_id(args.hub_model_id, args.output_dir, True, args.hub_token)}-range-{index}" \
        if args.push_to_hub else out
    key = family.model_key  # the pipeline argument: unet, or transformer (SD3, Flux)
    usage = f'''from diffusers import {pipe_class}, {model_class}
{key} = {model_class}.from_pretrained("{repo}")
pipe = {pipe_class}.from_pretrained("{args.pretrained_model_name_or_path}", {key}={key})
image = {call}.images[0]'''
    if placement == "official":
        usage += ('\n# official placement: re-attach the channel maps (stock loading leaves them out)\n'
                  'from utils.methods.channel_projection import attach_saved_projections  # this project\'s code\n'
                  f'attach_saved_projections(unet, "<local folder of {repo}>")')
    hub.save_training_card(
        out,
        title=f"DeMe range {index} ({lo} <= t < {hi}) of {args.pretrained_model_name_or_path}",
        base_model=args.pretrained_model_name_or_path,
        dataset=args.dataset, last_logs=last_logs,
        tags=["deme", "timestep-range", family.tag],
        description=(
            f"One of {args.num_ranges} copies of `{args.pretrained_model_name_or_path}` fine-tuned on `{args.dataset}` "
            f"with DeMe ([Ma et al., 2025](https://arxiv.org/abs/2410.06664)); this copy trained on timesteps "
            f"[{lo}, {hi}). Decouple-then-merge fine-tunes one copy per timestep range, so gradients of distant "
            "timesteps do not conflict, then merges the copies in parameter space with "
            "`merge_timestep_models.py`; use the merged model for sampling, this one as merge input."),
        hyperparameters=hyper,
        usage=usage,
    )


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
