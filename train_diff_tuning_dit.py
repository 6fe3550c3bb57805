#!/usr/bin/env python
"""Diff-Tuning (and standard fine-tuning) of a class-conditional DiT.

Diff-Tuning ("Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting", Zhong et al. 2024) keeps
what the pre-trained model knows near the data (small t) and re-learns the domain-specific large-t denoising:
each batch mixes memory-bank samples of the pre-trained model (null class, t ~ xi, "retention") with downstream
samples (their labels, t ~ psi, "adaptation"). `--method standard` is plain fine-tuning through the same code.

    accelerate launch train_diff_tuning_dit.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --dataset <hub id | image folder | save_to_disk folder> --output_dir out --method diff_tuning

Defaults reproduce the paper's DiT setup; see the README for where they differ from the official code.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import json
import logging
import os
import sys

import datasets
import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from tqdm.auto import tqdm

from utils.families.base import BankSettings
from utils.families.dit import DiT
from utils.families.registry import detect_family
from utils.families.tuning import (
    DEFAULT_LORA_TARGETS,
    TUNING_MODES,
    apply_tuning,
    difffit_block_count,
    fold_difffit_scales,
    parameter_counts,
    stock_model,
)
from utils.infra import hub, training
from utils.infra.checkpointing import check_resume, resume, run_identity, step_generator
from utils.infra.data import (
    ResumableLoader,
    check_images,
    class_names,
    load_image_dataset,
    require_column,
    worker_options,
)
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.outputs import check_output_dir, mark
from utils.methods.diff_tuning import DiffTuning, add_diff_tuning_args, check_diff_tuning_args

logger = get_logger(__name__)
SCRIPT = "train_diff_tuning_dit.py"  # marks the output folders it writes (utils.infra.outputs)
# the flags that decide which weights a checkpoint holds: a resume with others is refused
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "revision", "method", "tuning", "lora_rank", "difffit_blocks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=training.HelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="DiTPipeline Hub id or folder.")
    g.add_argument("--revision", default=None, help="Revision of the pre-trained pipeline on the Hub.")
    g.add_argument("--dataset", required=True, help="Hub id, folder of class sub-folders of images, or "
                   "save_to_disk folder.")
    g.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    g.add_argument("--train_split", default="train", help="Split to train on.")
    g.add_argument("--image_column", default=None, help="Image column (default: the only Image column, or 'image').")
    g.add_argument("--label_column", default=None,
                   help="Class column (default: the only ClassLabel column, or 'label').")
    g.add_argument("--cache_dir", default=None, help="Where downloaded datasets and models are cached.")
    g.add_argument("--output_dir", default="diff-tuning-dit",
                   help="Where the pipeline, card, logs and checkpoints go.")
    g.add_argument("--resolution", type=int, default=256,
                   help="Training resolution; must match the model's latent size.")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                   help="Random horizontal flips.")
    g.add_argument("--cache_latents", action="store_true", help="Encode the data (and its mirror) with the VAE once, "
                   "cached by `datasets`, instead of at every step.")
    g.add_argument("--skip_image_check", action="store_true", help="Do not decode every image before training.")

    g = add_diff_tuning_args(p, bank_guidance_scale=1.5, bank_batch_size=32,
                             bank_help="Bank rows: samples of random classes, trained on the null class.")
    g.add_argument("--label_dropout", type=float, default=0.1,
                   help="Downstream label dropout for classifier-free guidance.")

    g = p.add_argument_group("parameter-efficient tuning (orthogonal to --method)")
    g.add_argument("--tuning", choices=TUNING_MODES, default="full",
                   help="Which weights train: all, biases only (BitFit), DiffFit, or LoRA adapters (peft).")
    g.add_argument("--difffit_blocks", type=int, default=None,
                   help="DiffFit: the first blocks that get scale factors gamma (default: the first half, the paper's "
                        "14 of DiT-XL's 28).")
    g.add_argument("--difffit_lr_scale", type=float, default=10.0, help="DiffFit: learning-rate multiplier.")
    g.add_argument("--lora_rank", type=int, default=4, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")
    g.add_argument("--lora_target_modules", nargs="+", default=DEFAULT_LORA_TARGETS,
                   help="Module names that get LoRA adapters.")
    g.add_argument("--merge_lora", action="store_true",
                   help="Save a merged full DiTPipeline instead of the peft adapter.")

    training.add_optimisation_args(
        p, batch_size=32, batch_help="Batch per device, bank and data together (the paper: 32 on "
        "one device).", max_train_steps=24000, learning_rate=1e-4, max_grad_norm=None,
        ema_decay=0.9999, paper="DiT: 24K steps, lr 1e-4")
    g = training.add_output_args(p, checkpointing_steps=2000, validation_steps=2000)
    g.add_argument("--validation_guidance_scale", type=float, default=1.5,
                   help="CFG scale of validation/final samples.")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    check_args(args)
    return args


def check_args(args):
    """Hyper-parameters that cannot work, caught before anything is loaded."""
    training.check_common_args(args, positive=("resolution",))
    check_diff_tuning_args(args)
    if not 0 <= args.label_dropout < 1:
        raise UserError(f"--label_dropout must be in [0, 1), got {args.label_dropout}")
    check_output_dir(args.output_dir, SCRIPT, [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                               ("--dataset", args.dataset)])


@torch.no_grad()
def sample_images(transformer, vae, scheduler_config, class_ids, args, device):
    """Sample one image per class id with DDIM + CFG, as the paper evaluates; returns NHWC images in [0, 1]."""
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    return pipe(
        class_labels=class_ids,
        guidance_scale=args.validation_guidance_scale,
        num_inference_steps=args.validation_inference_steps,
        generator=generator,
        output_type="np",
    ).images


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = training.make_accelerator(args, args.output_dir, logging_dir)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.push_to_hub:
        hub.check_hub_access(args.hub_token)  # not after 24K steps

    # ---- Data: load and check everything cheap before any model is loaded.
    ds = load_image_dataset(args.dataset, args.train_split, args.dataset_config_name, args.cache_dir)
    image_column = require_column(ds, args.image_column, datasets.Image, "image", "--image_column")
    label_column = require_column(ds, args.label_column, datasets.ClassLabel, "label", "--label_column")
    names = class_names(ds, label_column)
    detect_family(args.pretrained_model_name_or_path, [DiT], "train_diff_tuning_dit.py", args.revision,
                  args.cache_dir)
    DiT.check_resolution(args.pretrained_model_name_or_path, args.resolution, args.revision, args.cache_dir)
    try:
        config = DiTTransformer2DModel.load_config(args.pretrained_model_name_or_path, subfolder="transformer",
                                                   revision=args.revision, cache_dir=args.cache_dir)
        noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                        revision=args.revision, cache_dir=args.cache_dir)
    except OSError as e:
        raise UserError(f"cannot load a DiTPipeline transformer from {args.pretrained_model_name_or_path!r}: "
                        f"{str(e).strip().splitlines()[0]}") from e
    num_label_rows = config["num_embeds_ada_norm"]  # ImageNet: 1000 rows, and row 1000 is the null class
    if len(names) > num_label_rows:
        raise UserError(f"dataset has {len(names)} classes but the model's label table has {num_label_rows} rows")
    diff_tuning = DiffTuning.from_args(args, noise_scheduler, condition_dropout=args.label_dropout)
    if len(ds) < diff_tuning.n_data * accelerator.num_processes:
        raise UserError(f"dataset has {len(ds)} images, fewer than one batch of {diff_tuning.n_data} downstream rows "
                        f"on each of {accelerator.num_processes} process(es); lower --train_batch_size")
    bank_plan = DiT.bank_plan(args.pretrained_model_name_or_path, BankSettings(
        args.memory_bank_guidance_scale, args.memory_bank_inference_steps, revision=args.revision,
        cache_dir=args.cache_dir), {})
    diff_tuning.check_bank(bank_plan.record, args.memory_bank_size, accelerator.num_processes)
    identity = run_identity(args, IDENTITY_FLAGS, SCRIPT, DiT.name)
    check_resume(args.output_dir, args.resume_from_checkpoint, identity, logger)
    if not args.skip_image_check:
        with accelerator.main_process_first():
            check_images(ds, image_column, lambda it, total: tqdm(it, total=total, desc="checking images",
                                                                  disable=not accelerator.is_local_main_process))

    if accelerator.is_main_process:
        mark(args.output_dir, SCRIPT)  # from here on this script writes into it

    # ---- Models.
    pipeline = DiTPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                           cache_dir=args.cache_dir)
    transformer, vae = pipeline.transformer, pipeline.vae
    DiT.switch_off_label_dropout(transformer)  # labels are dropped once per sample, by the method
    # checked now, not after the memory bank is generated
    difffit_blocks = difffit_block_count(transformer, args.difffit_blocks) if args.tuning == "difffit" else None
    vae = training.freeze(vae, accelerator.device, training.weight_dtype(accelerator))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        transformer.enable_xformers_memory_efficient_attention()
    family = DiT(transformer, vae, noise_scheduler, accelerator.device, args.random_flip)

    # ---- Memory bank (generated once, by all processes, with the pre-trained weights).
    transformer.to(accelerator.device)  # trainable weights stay fp32; mixed precision runs under autocast
    with accelerator.autocast():
        bank = diff_tuning.open_bank(accelerator, bank_plan.sampler(pipeline), args.memory_bank_batch_size, args.seed)

    # ---- Which weights train (after the bank, so that it always comes from the untouched pre-trained model).
    transformer = apply_tuning(transformer, args.tuning, difffit_blocks, args.lora_rank, args.lora_alpha,
                               args.lora_target_modules)
    trainable, total = parameter_counts(transformer)

    # ---- Data loaders: downstream rows and bank rows of every micro-batch.
    ds = ds.rename_column(label_column, "labels") if label_column != "labels" else ds
    if args.cache_latents:  # the VAE's moments of every image and its mirror, once (cached by datasets)
        with accelerator.main_process_first():
            ds = family.cache_latents(ds, image_column, args.resolution, accelerator.autocast,
                                      [args.pretrained_model_name_or_path, args.revision])
    rows, collate = family.data_view(ds, image_column, args.resolution)
    workers = worker_options(args.dataloader_num_workers)
    loader = torch.utils.data.DataLoader(rows, batch_size=diff_tuning.n_data, shuffle=True, drop_last=True,
                                         collate_fn=collate, **workers)
    bank_loader = diff_tuning.bank_loader(family, workers)
    length = training.run_length(args, len(loader), accelerator.num_processes)  # max steps or epochs

    # ---- Optimisation.
    learning_rate = training.effective_learning_rate(args, accelerator.num_processes)
    lr = learning_rate * (args.difffit_lr_scale if args.tuning == "difffit" else 1.0)
    optimizer, lr_scheduler = training.make_optimizer([p for p in transformer.parameters() if p.requires_grad], args,
                                                      accelerator, lr, length.max_train_steps)
    ema = training.make_ema(transformer, args.ema_decay, accelerator) if args.use_ema else None
    transformer, optimizer, lr_scheduler, loader = accelerator.prepare(transformer, optimizer, lr_scheduler, loader)
    if bank_loader is not None:
        bank_loader = accelerator.prepare(bank_loader)

    if accelerator.is_main_process:
        accelerator.init_trackers("diff-tuning-dit", config=training.tracker_config(args))

    # ---- Resume.
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint, logger, ema, identity)
    micro_step = global_step * args.gradient_accumulation_steps
    data_iter = ResumableLoader(loader, accelerator, micro_step)
    bank_iter = ResumableLoader(bank_loader, accelerator, micro_step) if bank_loader is not None else None

    training.log_running_training(
        logger, examples=len(ds), batch_size=diff_tuning.n_bank + diff_tuning.n_data,
        num_processes=accelerator.num_processes, accumulation=args.gradient_accumulation_steps, length=length,
        first_step=global_step, classes=len(names), data_rows_per_micro_batch=diff_tuning.n_data,
        memory_bank_rows_per_micro_batch=diff_tuning.n_bank,
        memory_bank=f"{len(bank)} samples" if bank is not None else "none",
        trainable_parameters=f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%, {args.tuning} tuning)")
    validation_classes = [i % len(names) for i in range(args.num_validation_images)]
    logs = {}
    transformer.train()
    progress = tqdm(range(length.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)

    while global_step < length.max_train_steps:
        generator = step_generator(args.seed, accelerator.process_index, micro_step, accelerator.device)
        micro_step += 1
        with accelerator.accumulate(transformer):
            loss, parts = diff_tuning(family, transformer, next(data_iter), next(bank_iter) if bank_iter else None,
                                      generator)
            training.apply_gradients(accelerator, transformer, loss, optimizer, lr_scheduler, args.max_grad_norm,
                                     step=global_step + 1, output_dir=args.output_dir)

        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = {"loss": loss.detach().item(), **{k: v.detach().item() for k, v in parts.items()},
                "lr": lr_scheduler.get_last_lr()[0]}
        if ema is not None:
            ema.step(transformer.parameters())
        training.log_step(accelerator, progress, logs, global_step)
        if global_step % length.checkpointing_steps == 0:
            training.checkpoint(accelerator, transformer, global_step, args.output_dir, args.checkpoints_total_limit,
                                identity, logger)
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            # autocast: the frozen VAE is in the mixed-precision dtype
            with training.averaged_weights(accelerator.unwrap_model(transformer), ema) as model, accelerator.autocast():
                images = sample_images(stock_model(model), vae, pipeline.scheduler.config, validation_classes,
                                       args, accelerator.device)
            training.log_images(accelerator, "validation", images, global_step)
    progress.close()

    # ---- Save a stock DiTPipeline, the class names and a model card.
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(transformer)
    if ema is not None:
        ema.copy_to(model.parameters())
    # nothing non-finite is saved or pushed
    training.check_finite_weights(accelerator, model, global_step, args.output_dir)
    if accelerator.is_main_process:
        model.eval()
        if vae.dtype != torch.float32:
            vae.to(torch.float32)  # it ran in the mixed-precision dtype; the saved pipeline is fp32
        if args.tuning == "difffit":
            fold_difffit_scales(model)  # a stock DiTTransformer2DModel again, same outputs
        if args.tuning == "lora" and not args.merge_lora:
            model.save_pretrained(args.output_dir)  # adapter_config.json + adapter_model.safetensors
            with open(os.path.join(args.output_dir, "id2label.json"), "w") as f:
                json.dump({str(i): name for i, name in enumerate(names)}, f, indent=2)
        else:
            model = model.merge_and_unload() if args.tuning == "lora" else model
            save_pipeline(model, vae, pipeline.scheduler, names, args.output_dir)
        images = sample_images(stock_model(model), vae, pipeline.scheduler.config, validation_classes, args,
                               accelerator.device)
        training.image_grid(images).save(os.path.join(args.output_dir, "samples.png"))
        training.log_images(accelerator, "final", images, global_step)
        repo = hub.hub_repo_id(args.hub_model_id, args.output_dir, args.push_to_hub, args.hub_token)
        write_card(args, names, diff_tuning, trainable, total, logs, accelerator.mixed_precision, learning_rate,
                   difffit_blocks, global_step, repo)
        if args.push_to_hub:
            diff_tuning.push(args.output_dir, repo, args.hub_token, args.hub_private_repo, logger)
    model = accelerator.unwrap_model(transformer)
    # The DDP wrapper must go before the process group ends (utils.infra.training.end_training).
    transformer = optimizer = lr_scheduler = loader = bank_loader = None  # noqa: F841
    training.end_training(accelerator)
    return model


def save_pipeline(transformer, vae, scheduler, names, output_dir):
    """Save a stock DiTPipeline; `id2label` goes into model_index.json, where `DiTPipeline.from_pretrained` reads
    it (its `save_pretrained` does not write it)."""
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(output_dir)
    index_path = os.path.join(output_dir, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["id2label"] = {str(i): name for i, name in enumerate(names)}
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)



def write_card(args, names, diff_tuning, trainable, total, last_logs, mixed_precision, learning_rate,
               difffit_blocks, steps, repo):
    """`diff_tuning`: the method (its card text, fields and tag); `mixed_precision`: the effective
    one (also when accelerate's config set it); `learning_rate` after --scale_lr; `difffit_blocks` as resolved;
    `steps`: the optimizer steps trained."""
    method = "Diff-Tuning" if args.method == "diff_tuning" else "standard fine-tuning"
    tuning = {"full": "all weights", "bitfit": "bias terms only (BitFit)", "lora": "LoRA adapters",
              "difffit": "DiffFit (biases, class embedding, scale factors)"}[args.tuning]
    hyper = {"method": args.method, "tuning": args.tuning, "steps": steps,
             "train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
             "learning_rate": learning_rate, "lr_scheduler": args.lr_scheduler, "resolution": args.resolution,
             "label_dropout": args.label_dropout, "use_ema": args.use_ema, "mixed_precision": mixed_precision,
             "seed": args.seed, "trainable_parameters": f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"}
    if args.tuning == "difffit":
        hyper.update({"difffit_blocks": difffit_blocks, "difffit_lr_scale": args.difffit_lr_scale})
    if args.tuning == "lora":
        hyper.update({"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha or args.lora_rank,
                      "lora_target_modules": " ".join(args.lora_target_modules), "merged": args.merge_lora})
    hyper.update(diff_tuning.card_fields())
    description = (
        f"A class-conditional DiT fine-tuned from `{args.pretrained_model_name_or_path}` on `{args.dataset}` "
        f"({len(names)} classes) with {method}, training {tuning}. "
        + diff_tuning.card_text("samples of the pre-trained model (null class)"))
    example = ", ".join(repr(n) for n in names[:2])
    if args.tuning == "lora" and not args.merge_lora:
        labels = f'hf_hub_download("{repo}", "id2label.json")' if args.push_to_hub else f'"{repo}/id2label.json"'
        load = f'''import json
from huggingface_hub import hf_hub_download
from peft import PeftModel

id2label = json.load(open({labels}))
pipe = DiTPipeline.from_pretrained("{args.pretrained_model_name_or_path}", id2label=id2label)
pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "{repo}").merge_and_unload()'''
    else:
        load = f'pipe = DiTPipeline.from_pretrained("{repo}")'
    usage = f'''import torch
from diffusers import DiTPipeline
{load}
print(pipe.labels)  # the fine-tuned classes: {dict(list((n, i) for i, n in enumerate(names))[:3])} ...
class_ids = pipe.get_label_ids([{example}])
images = pipe(class_labels=class_ids, guidance_scale={args.validation_guidance_scale}, num_inference_steps=50,
              generator=torch.manual_seed(0)).images'''
    hub.save_training_card(
        args.output_dir,
        title=f"{method} of {args.pretrained_model_name_or_path} on {args.dataset}",
        base_model=args.pretrained_model_name_or_path,
        dataset=args.dataset, last_logs=last_logs,
        tags=["dit", "class-conditional", diff_tuning.tag, args.tuning],
        description=description,
        hyperparameters=hyper,
        usage=usage,
    )


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
