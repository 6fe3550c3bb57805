#!/usr/bin/env python
"""Bi-tuning (and plain fine-tuning) of a pre-trained transformers image classifier.

Bi-tuning ("Bi-tuning of Pre-trained Representations", Zhong et al. 2020) adds two heads on the features that feed
the classification layer: the classifier, trained with cross-entropy plus a contrastive cross-entropy against the
class directions, and a projector trained with a categorical contrastive loss whose positives are same-class keys
of a momentum encoder, kept in per-class queues. `--method standard` is plain fine-tuning through the same code
(same data, optimiser, learning-rate groups and schedule; one view, cross-entropy only), and `--method two_view_ce`
the control that averages the cross-entropy of Bi-tuning's two views. Each is one object from
`utils.methods.bi_tuning` (Bi-tuning's holds the key encoder, the queues and the momentum update): the loop draws
the views it asks for and calls it, `loss, parts, logits = method(views, labels)`.

    accelerate launch train_bi_tuning.py --pretrained_model_name_or_path microsoft/resnet-50 \\
        --dataset <hub id | folder of class sub-folders | save_to_disk folder> --output_dir out \\
        [--method bi_tuning|standard|two_view_ce] [--train_fraction 0.15 | --samples_per_class 10]

Defaults are the reference code's published supervised commands (thuml/Transfer-Learning-Library with
`--finetune`); the README lists where that code differs from the paper and what we keep.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import logging
import os
import sys
from typing import NamedTuple

import datasets
import numpy as np
import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification

from utils.families.image_classifiers import (
    classifier_class,
    find_head,
    input_size,
    load_classifier_config,
    load_image_processor,
    normalisation,
    replace_head,
    set_resolution,
)
from utils.infra import hub, training
from utils.infra.augmentation import as_uint8_tensor, normalise, random_resized_views
from utils.infra.checkpointing import resume, run_identity, step_generator
from utils.infra.data import (
    DatasetError,
    ResumableLoader,
    check_images,
    class_names,
    find_column,
    load_image_dataset,
    load_image_splits,
    per_class_subset,
    pick_split,
    require_column,
    stratified_split,
    worker_options,
)
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.outputs import check_output_dir, mark, write_json_atomically
from utils.methods.bi_tuning import METHODS, ClassQueues, TwoHeadClassifier, make_method

logger = get_logger(__name__)


class Result(NamedTuple):
    model: TwoHeadClassifier  # the trained query model (classifier and projector)
    metrics: dict  # held-out metrics after the last step
    queues: ClassQueues | None  # this process's class queues (Bi-tuning)

SCRIPT = "train_bi_tuning.py"  # marks the output folders it writes (utils.infra.outputs)
# the flags that decide which weights a checkpoint holds: a resume with others is refused
IDENTITY_FLAGS = ("pretrained_model_name_or_path", "revision", "method", "queue_size", "projection_dim")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=training.HelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", "--model_name_or_path", dest="pretrained_model_name_or_path",
                   required=True, help="Any AutoModelForImageClassification checkpoint (Hub id or folder) with an "
                   "image processor; its classification layer is always replaced by a new one. --model_name_or_path "
                   "(transformers' run_image_classification) is an alias.")
    g.add_argument("--revision", default=None, help="Revision of the pre-trained model on the Hub.")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="Allow a model whose repository holds its own Python code (an auto_map in its config) to run "
                        "it; only for repositories you trust.")
    g.add_argument("--dataset", "--dataset_name", "--train_dir", dest="dataset", required=True,
                   help="Hub id, folder of class sub-folders of images, or save_to_disk folder. --dataset_name and "
                        "--train_dir (transformers' names) are aliases.")
    g.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    g.add_argument("--train_split", default="train", help="Split to train on.")
    g.add_argument("--validation_dir", default=None,
                   help="A folder of class sub-folders held out for evaluation (transformers' name; its class names "
                        "must be the training data's); the same as a 'validation' split.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on a seeded subset of this many images (after any label subset).")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="Evaluate on a seeded subset of this many held-out images.")
    g.add_argument("--validation_split", default=None,
                   help="Held-out split to report on (default: 'validation' if the dataset has one, else "
                        "--train_val_split of the training split, stratified).")
    g.add_argument("--train_val_split", type=float, default=0.15,
                   help="Fraction of each class held out for evaluation when there is no validation split.")
    g.add_argument("--image_column", default=None, help="Image column (default: the only Image column, or 'image').")
    g.add_argument("--label_column", default=None,
                   help="Class column (default: the only ClassLabel column, or 'label').")
    subset = g.add_mutually_exclusive_group()
    subset.add_argument("--train_fraction", type=float, default=None,
                        help="Train on this fraction of each class's images (seeded; e.g. 0.15 for the paper's 15%% "
                             "labels). The chosen rows are written to train_subset.json.")
    subset.add_argument("--samples_per_class", type=int, default=None,
                        help="Train on this many images of each class (seeded; all of a smaller class).")
    g.add_argument("--resolution", type=int, default=None,
                   help="Input size (default: the image processor's); the saved processor is set to it.")
    g.add_argument("--crop_scale", type=float, nargs=2, default=[0.2, 1.0], metavar=("MIN", "MAX"),
                   help="Area range of the random resized crops (the reference's 0.2-1).")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                   help="Random horizontal flips.")
    g.add_argument("--cache_dir", default=None, help="Where downloaded datasets and models are cached.")
    g.add_argument("--output_dir", default="bi-tuning-classifier",
                   help="Where the model, processor, results, card, logs and checkpoints go.")
    g.add_argument("--skip_image_check", action="store_true", help="Do not decode every image before training.")

    g = p.add_argument_group("Bi-tuning")
    g.add_argument("--method", choices=METHODS, default="bi_tuning",
                   help="bi_tuning: two heads, contrastive losses, momentum keys; standard: plain fine-tuning "
                        "(cross-entropy on one view); two_view_ce: a control, plain fine-tuning with the mean "
                        "cross-entropy of two augmented views (the two views Bi-tuning draws), to tell a gain of the "
                        "contrastive losses from a gain of seeing a second view.")
    g.add_argument("--queue_size", type=int, default=40, help="Keys kept per class (K).")
    g.add_argument("--temperature", type=float, default=0.07, help="Temperature T of both contrastive losses.")
    g.add_argument("--key_momentum", type=float, default=0.999,
                   help="Momentum m of the key encoder: k <- m k + (1 - m) q once per optimizer step.")
    g.add_argument("--projection_dim", type=int, default=128, help="Output size of the projector.")
    g.add_argument("--projector_loss_weight", type=float, default=1.0,
                   help="Weight of the projector's categorical contrastive loss.")
    g.add_argument("--classifier_contrast_weight", type=float, default=1.0,
                   help="Weight of the classifier's contrastive cross-entropy.")

    g = p.add_argument_group("optimisation (SGD, as the reference)")
    g.add_argument("--train_batch_size", "--per_device_train_batch_size", dest="train_batch_size", type=int,
                   default=48, help="Batch per device (the reference: 48); --per_device_train_batch_size is an alias.")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: the reference's (Nesterov, --sgd_momentum, --weight_decay); adamw: what ViT and Swin are "
                        "usually fine-tuned with (torch AdamW, --weight_decay; the same learning-rate groups).")
    training.add_run_length_args(g, 10000, "Optimizer steps (the reference: 10,000).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per optimizer step (each micro-batch's keys are enqueued).")
    g.add_argument("--learning_rate", type=float, default=0.01, help="Learning rate of the new classifier head.")
    g.add_argument("--backbone_lr_scale", type=float, default=0.1,
                   help="Backbone lr = this x --learning_rate (the reference's --finetune: 0.1).")
    g.add_argument("--projector_lr_scale", type=float, default=0.1,
                   help="Projector lr = this x --learning_rate (the reference trains it at 0.1x too, though new).")
    g.add_argument("--scale_lr", action="store_true", help="Multiply the lr by accumulation x batch x processes.")
    g.add_argument("--sgd_momentum", type=float, default=0.9, help="SGD momentum.")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum.")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="Weight decay (every parameter, as the reference).")
    g.add_argument("--lr_scheduler", default="step", choices=["step", *training.LR_SCHEDULERS],
                   help="step: multiply the lr by --lr_decay_factor at each of --lr_decay_steps (the reference); "
                        "or a diffusers schedule.")
    training.add_lr_shape_args(g)
    g.add_argument("--lr_decay_steps", type=int, nargs="+", default=None,
                   help="Steps of the 'step' schedule (default: 60%% of the run, the reference's 6,000 of 10,000).")
    g.add_argument("--lr_decay_factor", type=float, default=0.1, help="Factor of each decay of the 'step' schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the diffusers schedules.")
    g.add_argument("--max_grad_norm", type=float, default=None, help="Gradient clipping norm (default: off).")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Mixed precision (default: accelerate config).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Trade compute for activation memory (models that support it).")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument("--per_device_eval_batch_size", type=int, default=64, help="Batch per device when evaluating.")
    g.add_argument("--seed", type=int, default=0, help="Seed of every random choice; runs are reproducible.")

    g = training.add_output_args(
        p, checkpointing_steps=1000, validation_steps=1000, sampling=False,
        validation_help="Evaluate on the held-out split every N steps (0: only after the last step).")
    g.add_argument("--tracker_project_name", default="bi-tuning", help="Project name of the trackers.")
    g.add_argument("--with_tracking", action="store_true",
                   help="Accepted for transformers' example commands: here the trackers are on unless --report_to "
                        "none (default: tensorboard), so the flag changes nothing.")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    check_args(args)
    return args


def check_args(args):
    """Hyper-parameters that cannot work, caught before anything is loaded."""
    training.check_common_args(
        args, positive=("queue_size", "projection_dim", "per_device_eval_batch_size", "resolution",
        "max_train_samples", "max_eval_samples"))
    if args.validation_dir and args.validation_split:
        raise UserError("--validation_dir and --validation_split both name the held-out data; give one")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise UserError(f"--train_fraction must be in (0, 1], got {args.train_fraction}")
    if args.samples_per_class is not None and args.samples_per_class < 1:
        raise UserError(f"--samples_per_class must be >= 1, got {args.samples_per_class}")
    if args.validation_split is not None and args.validation_split == args.train_split:
        raise UserError(f"--validation_split {args.validation_split} is the training split: held-out metrics need "
                        "another split (or leave it out: --train_val_split holds out part of the training split)")
    if args.with_tracking and args.report_to == "none":
        raise UserError("--with_tracking and --report_to none contradict each other; give one")
    if not 0 < args.train_val_split < 1:
        raise UserError(f"--train_val_split must be in (0, 1), got {args.train_val_split}")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 <= args.key_momentum <= 1:
        raise UserError(f"--key_momentum must be in [0, 1], got {args.key_momentum}")
    for name in ("projector_loss_weight", "classifier_contrast_weight", "backbone_lr_scale", "projector_lr_scale",
                 "weight_decay", "sgd_momentum"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.nesterov and args.sgd_momentum == 0:
        raise UserError("--nesterov needs --sgd_momentum > 0 (or pass --no-nesterov)")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop_scale must satisfy 0 < MIN <= MAX <= 1, got {args.crop_scale[0]} {args.crop_scale[1]}")
    if args.lr_decay_steps is not None:
        if args.lr_scheduler != "step":
            raise UserError(f"--lr_decay_steps is for --lr_scheduler step, not {args.lr_scheduler}")
        if args.num_train_epochs is None:  # else checked once the data gives the step count
            check_decay_steps(args, args.max_train_steps)
        if sorted(set(args.lr_decay_steps)) != args.lr_decay_steps:
            raise UserError("--lr_decay_steps must be increasing")
    if not 0 < args.lr_decay_factor <= 1:
        raise UserError(f"--lr_decay_factor must be in (0, 1], got {args.lr_decay_factor}")
    check_output_dir(args.output_dir, SCRIPT, [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                               ("--dataset", args.dataset),
                                               ("--validation_dir", args.validation_dir)])


def check_decay_steps(args, max_train_steps: int) -> None:
    for step in args.lr_decay_steps or ():
        if not 0 < step < max_train_steps:
            raise UserError(f"--lr_decay_steps {step} is beyond the run: decay steps must lie in 1.."
                            f"{max_train_steps - 1} (the run has {max_train_steps} steps)")


def decay_steps(args, max_train_steps: int) -> list[int]:
    """The 'step' schedule's decay steps: as given, or 60% of the run (the reference's 6,000 of 10,000)."""
    return args.lr_decay_steps or [max(1, round(0.6 * max_train_steps))]


def make_lr_scheduler(optimizer, args, num_processes: int, max_train_steps: int):
    """The reference's step decay (diffusers' piecewise_constant) or a diffusers schedule over `max_train_steps`.
    A prepared scheduler is stepped once per process per optimizer step, so every step count is multiplied by the
    process count."""
    if args.lr_scheduler == "step":
        steps = decay_steps(args, max_train_steps)
        rules = "".join(f"{args.lr_decay_factor ** i:g}:{step * num_processes}," for i, step in enumerate(steps))
        rules += f"{args.lr_decay_factor ** len(steps):g}"
        return get_scheduler("piecewise_constant", optimizer=optimizer, step_rules=rules)
    return training.lr_schedule(optimizer, args, num_processes, max_train_steps)


def split_data(splits, args):
    """(train rows, held-out rows, image column, label column, class names, subset record for train_subset.json)."""
    train = pick_split(splits, args.train_split, args.dataset)
    image_column = require_column(train, args.image_column, datasets.Image, "image", "--image_column")
    if args.label_column is None and find_column(train, None, datasets.ClassLabel, "label") is None:
        folders = [d for d in os.listdir(args.dataset) if os.path.isdir(os.path.join(args.dataset, d))] \
            if os.path.isdir(args.dataset) else []
        if len(folders) == 1:  # datasets reads one class sub-folder as no labels at all
            raise DatasetError(f"dataset {args.dataset} holds one class sub-folder ({folders[0]}); a classifier needs "
                               "at least 2 classes: add a sub-folder of images per class")
    label_column = require_column(train, args.label_column, datasets.ClassLabel, "label", "--label_column")
    names = class_names(train, label_column)
    if len(names) < 2:
        raise DatasetError(f"dataset {args.dataset} has {len(names)} class; a classifier needs at least 2")
    record = {"seed": args.seed}
    validation_split = args.validation_split or ("validation" if "validation" in splits
                                                 and args.train_split != "validation" else None)
    if validation_split is not None:
        held_out = pick_split(splits, validation_split, args.dataset)
        for column in (image_column, label_column):
            if column not in held_out.column_names:
                raise DatasetError(f"split {validation_split!r} has no column {column!r}")
        held_names = getattr(held_out.features[label_column], "names", None)
        if held_names is not None and held_names != names:
            raise DatasetError(f"split {validation_split!r} has the classes {held_names[:5]}..., the training data "
                               f"{names[:5]}...: the class folders must be the same")
        bad = [v for v in held_out.unique(label_column) if not isinstance(v, (int, np.integer)) or
               not 0 <= v < len(names)]
        if bad:
            raise DatasetError(f"split {validation_split!r} holds labels {bad[:5]} that are not class ids "
                               f"0..{len(names) - 1} of the training split")
        record["validation"] = validation_split
    else:
        kept, held = stratified_split(train[label_column], len(names), args.train_val_split, args.seed)
        held_out, train = train.select(held), train.select(kept)
        record.update(validation=f"{args.train_val_split:g} of split {args.train_split!r}, stratified",
                      validation_indices=held.tolist(), train_split_indices=kept.tolist())
    if args.train_fraction is not None or args.samples_per_class is not None:
        chosen = per_class_subset(train[label_column], len(names), args.seed, args.train_fraction,
                                  args.samples_per_class)
        train = train.select(chosen)
        record.update(train_fraction=args.train_fraction, samples_per_class=args.samples_per_class,
                      train_indices=chosen.tolist())
    for name, flag in (("train", "max_train_samples"), ("held_out", "max_eval_samples")):
        limit, rows = getattr(args, flag), train if name == "train" else held_out
        if limit is not None and limit < len(rows):
            rows = rows.shuffle(seed=args.seed).select(range(limit))
            train, held_out = (rows, held_out) if name == "train" else (train, rows)
            record[flag] = limit
    counts = np.bincount(np.asarray(train[label_column], dtype=np.int64), minlength=len(names))
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(f"{len(empty)} class(es) have no training image (first: {empty[0]!r})"
                           + (" after --train_fraction / --samples_per_class; raise it" if "train_indices" in record
                              else ""))
    record["train_images_per_class"] = dict(zip(names, counts.tolist()))
    return train, held_out, image_column, label_column, names, record


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int) -> tuple[dict, torch.Tensor]:
    """Held-out accuracy and mean per-class accuracy of the query classifier (eval mode), over all processes.
    Returns (metrics, confusion matrix rows = true class)."""
    model.eval()
    predictions, targets = [], []
    for batch in loader:
        logits = model(batch["pixel_values"]).logits
        pred, true = accelerator.gather_for_metrics((logits.argmax(1), batch["labels"]))
        predictions.append(pred.cpu())
        targets.append(true.cpu())
    model.train()
    true, pred = torch.cat(targets).long(), torch.cat(predictions).long()
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    per_class = confusion.diag() / confusion.sum(1)  # NaN for a class with no held-out image: left out below
    metrics = {"eval_accuracy": float(confusion.diag().sum() / confusion.sum()),
               "eval_mean_class_accuracy": float(per_class[~per_class.isnan()].mean()),
               "eval_samples": int(confusion.sum())}
    return metrics, confusion


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = training.make_accelerator(args, args.output_dir, logging_dir)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.push_to_hub:
        hub.check_hub_access(args.hub_token)  # not after 10K steps

    # ---- Data and model config: everything cheap is checked before any weights load.
    splits = load_image_splits(args.dataset, args.dataset_config_name, args.cache_dir)
    if args.validation_dir:
        splits["validation"] = load_image_dataset(args.validation_dir, cache_dir=args.cache_dir)
    train_ds, eval_ds, image_column, label_column, names, subset = split_data(splits, args)
    if len(train_ds) < args.train_batch_size * accelerator.num_processes:
        raise UserError(f"{len(train_ds)} training images, fewer than one batch of {args.train_batch_size} on each of "
                        f"{accelerator.num_processes} process(es); lower --train_batch_size")
    # --max_train_steps or --num_train_epochs (the loader drops the last partial batch)
    length = training.run_length(args, len(train_ds) // args.train_batch_size, accelerator.num_processes)
    check_decay_steps(args, length.max_train_steps)
    config = load_classifier_config(args.pretrained_model_name_or_path, args.revision, args.cache_dir,
                                    args.trust_remote_code)
    model_class = classifier_class(config, args.pretrained_model_name_or_path, args.revision)
    if args.gradient_checkpointing and not model_class.supports_gradient_checkpointing:
        raise UserError(f"--gradient_checkpointing: {model_class.__name__} does not support it")
    processor = load_image_processor(args.pretrained_model_name_or_path, args.revision, args.cache_dir,
                                     args.trust_remote_code)
    if args.resolution is not None:
        set_resolution(processor, args.resolution)
    size = input_size(processor)
    rescale, mean, std = normalisation(processor)
    if not args.skip_image_check:
        with accelerator.main_process_first():
            for part in (train_ds, eval_ds):
                check_images(part, image_column, lambda it, total: tqdm(
                    it, total=total, desc="checking images", disable=not accelerator.is_local_main_process))

    if accelerator.is_main_process:
        mark(args.output_dir, SCRIPT)  # from here on this script writes into it
        # which rows trained and which were held out (a carved split, a label subset), and the per-class counts
        write_json_atomically(os.path.join(args.output_dir, "train_subset.json"), subset)

    # ---- Models: the classifier with a NEW head, and the method around it (Bi-tuning: the projector, the key
    # encoder and the class queues).
    # transformers reports the head's size mismatch in a LOAD REPORT; the head is replaced on purpose just below
    loading = transformers.utils.logging.get_logger("transformers.modeling_utils")
    not_the_report = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    loading.addFilter(not_the_report)
    try:
        classifier = AutoModelForImageClassification.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir,
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True, trust_remote_code=args.trust_remote_code)
    finally:
        loading.removeFilter(not_the_report)
    classifier.config.problem_type = "single_label_classification"
    head_path = find_head(classifier, size, getattr(config, "num_channels", 3))
    replace_head(classifier, head_path, len(names))  # from_pretrained keeps an old head of the same size
    if args.gradient_checkpointing:  # transformers 5 renamed it; older versions only have the first name
        getattr(classifier, "activation_checkpointing_enable", classifier.gradient_checkpointing_enable)()
    method = make_method(
        args.method, classifier, head_path, len(names), projection_dim=args.projection_dim,
        queue_size=args.queue_size, key_momentum=args.key_momentum, temperature=args.temperature,
        projector_weight=args.projector_loss_weight, classifier_weight=args.classifier_contrast_weight,
        accumulation_steps=args.gradient_accumulation_steps,
        generator=torch.Generator().manual_seed(args.seed),  # the queues' initial random keys
        gather=accelerator.gather, autocast=accelerator.autocast).to(accelerator.device)
    feature_dim = method.query.head.in_features
    accelerator.register_for_checkpointing(*method.training_state)  # the key encoder and the queues

    # ---- Data loaders. Training images arrive as uint8 tensors; crops and flips are drawn in the loop from the
    # step's own generator. Evaluation uses the image processor itself, as inference will.
    short_side = 2 * max(size)

    def train_transform(batch):
        return {"images": [as_uint8_tensor(img, short_side) for img in batch[image_column]],
                "labels": batch[label_column]}

    def eval_transform(batch):
        pixels = processor([img.convert("RGB") for img in batch[image_column]], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": batch[label_column]}

    def collate_images(rows):
        return {"images": [r["images"] for r in rows], "labels": torch.tensor([r["labels"] for r in rows])}

    workers = worker_options(args.dataloader_num_workers)
    loader = torch.utils.data.DataLoader(
        train_ds.select_columns([image_column, label_column]).with_transform(train_transform),
        batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_images, **workers)
    eval_loader = torch.utils.data.DataLoader(
        eval_ds.select_columns([image_column, label_column]).with_transform(eval_transform),
        batch_size=args.per_device_eval_batch_size, **workers)

    # ---- Optimisation: SGD with three learning-rate groups (head, backbone, projector) over what trains.
    learning_rate = training.effective_learning_rate(args, accelerator.num_processes)
    query = method.query
    head_params = list(query.head.parameters())
    backbone_params = [p for p in query.classifier.parameters() if all(p is not h for h in head_params)]
    groups = [{"params": head_params, "lr": learning_rate},
              {"params": backbone_params, "lr": learning_rate * args.backbone_lr_scale}]
    if query.projector is not None:
        groups.append({"params": list(query.projector.parameters()), "lr": learning_rate * args.projector_lr_scale})
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=learning_rate, momentum=args.sgd_momentum, nesterov=args.nesterov,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes, length.max_train_steps)
    model, optimizer, lr_scheduler, loader, eval_loader = accelerator.prepare(query, optimizer, lr_scheduler, loader,
                                                                              eval_loader)
    method.run_query_through(model)  # under DDP the wrapper, which synchronises the gradients
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=training.tracker_config(args))

    # ---- Resume (the key encoder and the queues are part of the state).
    identity = {**run_identity(args, IDENTITY_FLAGS, SCRIPT), "num classes": len(names)}
    global_step = resume(accelerator, args.output_dir, args.resume_from_checkpoint, logger, identity=identity)
    micro_step = global_step * args.gradient_accumulation_steps
    train_iter = ResumableLoader(loader, accelerator, micro_step)

    logger.info(f"{len(train_ds)} training and {len(eval_ds)} held-out images in {len(names)} classes; "
                f"new head at {head_path} on {feature_dim} features; "
                f"inputs {size[0]}x{size[1]}; {args.method}; steps {global_step} -> {length.max_train_steps}")
    logs, metrics = {}, {}
    model.train()
    progress = tqdm(range(length.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    while global_step < length.max_train_steps:
        batch = next(train_iter)
        generator = step_generator(args.seed, accelerator.process_index, micro_step, "cpu")
        labels = batch["labels"]
        # The query view is drawn first, so that Bi-tuning with both contrastive weights 0 sees the same query
        # views as --method standard.
        views = [random_resized_views(batch["images"], size, generator, args.crop_scale, flip=args.random_flip)
                 for _ in range(method.num_views)]
        views = [normalise(v, rescale, mean, std) for v in views]
        micro_step += 1

        with accelerator.accumulate(model):
            # Bi-tuning moves its key encoder on a step's first micro-batch and enqueues every micro-batch's keys
            loss, parts, logits = method(views, labels)
            training.apply_gradients(accelerator, model, loss, optimizer, lr_scheduler, args.max_grad_norm,
                                     step=global_step + 1, output_dir=args.output_dir)

        if not accelerator.sync_gradients:
            continue
        global_step += 1
        logs = {"loss": loss.detach().item(), **{k: v.detach().item() for k, v in parts.items()},
                "train_batch_accuracy": (logits.argmax(1) == labels).float().mean().item(),
                "lr": lr_scheduler.get_last_lr()[0]}
        training.log_step(accelerator, progress, logs, global_step)
        if global_step % length.checkpointing_steps == 0:
            training.checkpoint(
                accelerator, model, global_step, args.output_dir, args.checkpoints_total_limit, identity, logger)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < length.max_train_steps:
            metrics, _ = evaluate(model, eval_loader, accelerator, len(names))
            accelerator.log(metrics, step=global_step)
            logger.info(f"step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    progress.close()

    # ---- The last step's held-out metrics (never a best-of-run pick), then a stock classifier and its card.
    accelerator.wait_for_everyone()
    metrics, confusion = evaluate(model, eval_loader, accelerator, len(names))
    accelerator.log(metrics, step=global_step)
    unwrapped = accelerator.unwrap_model(model)
    training.check_finite_weights(accelerator, unwrapped, global_step, args.output_dir)  # nothing non-finite is saved
    if accelerator.is_main_process:
        classifier = unwrapped.classifier.eval()
        classifier.save_pretrained(args.output_dir)  # config.json (class names) + model.safetensors: no projector
        processor.save_pretrained(args.output_dir)
        results = {**metrics, "step": global_step, "method": args.method, "train_samples": len(train_ds),
                   "train_fraction": args.train_fraction, "samples_per_class": args.samples_per_class}
        write_json_atomically(os.path.join(args.output_dir, "all_results.json"), results)
        save_confusion_matrix(confusion, names, os.path.join(args.output_dir, "confusion_matrix.png"))
        write_card(args, names, len(train_ds), len(eval_ds), subset["validation"], metrics, logs,
                   accelerator.mixed_precision, learning_rate, global_step)
        logger.info("held-out after the last step: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.push_to_hub:
            repo = hub.hub_repo_id(args.hub_model_id, args.output_dir, args.push_to_hub, args.hub_token)
            repo = hub.push_folder(args.output_dir, repo, args.hub_token, args.hub_private_repo)
            logger.info(f"pushed to https://huggingface.co/{repo}")
    # The DDP wrapper must go before the process group ends (utils.infra.training.end_training), the method's too.
    model = optimizer = lr_scheduler = loader = eval_loader = None  # noqa: F841
    method.run_query_through(method.query)
    training.end_training(accelerator)
    return Result(unwrapped, metrics, method.queues)


def save_confusion_matrix(confusion: torch.Tensor, names, path: str) -> None:
    """The held-out confusion matrix as a picture (rows: true class, normalised per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = (confusion / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    side = min(12, 2 + 0.35 * len(names))
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"held-out accuracy {confusion.diag().sum() / confusion.sum():.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_card(args, names, num_train, num_eval, validation, metrics, last_logs, mixed_precision, learning_rate,
               steps):
    """`mixed_precision`: the effective one; `learning_rate` after --scale_lr; `steps`: the optimizer steps
    trained."""
    bi = args.method == "bi_tuning"
    label_share = (f"{args.train_fraction:g} of each class's images" if args.train_fraction is not None else
                   f"{args.samples_per_class} images per class" if args.samples_per_class is not None else "all labels")
    hyper = {"method": args.method, "steps": steps, "train_batch_size": args.train_batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer":
             f"SGD (momentum {args.sgd_momentum}, nesterov {args.nesterov}, weight decay {args.weight_decay})"
             if args.optimizer == "sgd" else f"AdamW (weight decay {args.weight_decay})",
             "learning_rate (head)": learning_rate, "backbone_lr_scale": args.backbone_lr_scale,
             "lr_scheduler": args.lr_scheduler, "labels used": label_share, "training images": num_train,
             "held-out images": f"{num_eval} ({validation})", "crop_scale": " ".join(map(str, args.crop_scale)),
             "random_flip": args.random_flip, "mixed_precision": mixed_precision, "seed": args.seed}
    if args.lr_scheduler == "step":
        hyper.update({"lr_decay_steps": " ".join(map(str, decay_steps(args, steps))),
                      "lr_decay_factor": args.lr_decay_factor})
    if bi:
        hyper.update({"projector_lr_scale": args.projector_lr_scale, "queue_size": args.queue_size,
                      "temperature": args.temperature, "key_momentum": args.key_momentum,
                      "projection_dim": args.projection_dim, "projector_loss_weight": args.projector_loss_weight,
                      "classifier_contrast_weight": args.classifier_contrast_weight})
    description = (
        f"An image classifier fine-tuned from `{args.pretrained_model_name_or_path}` on `{args.dataset}` "
        f"({len(names)} classes, {label_share}) with "
        + ("Bi-tuning ([Zhong et al., 2020](https://arxiv.org/abs/2011.06182)): besides cross-entropy, a contrastive "
           "cross-entropy against the class directions and a projector head with a categorical contrastive loss "
           "over per-class queues of momentum-encoder keys. The projector and key encoder were used in training "
           "only; this folder holds the classifier alone." if bi else
           "plain fine-tuning (cross-entropy, a new classification head"
           + (", averaged over two augmented views of each image)." if args.method == "two_view_ce" else ")."))
        + " Metrics are those of the last training step on held-out images (no best-of-run selection)."
    )
    repo = hub.hub_repo_id(args.hub_model_id, args.output_dir, args.push_to_hub, args.hub_token)
    usage = f'''from transformers import pipeline

classifier = pipeline("image-classification", model="{repo}")
print(classifier("image.jpg"))  # classes: {", ".join(names[:4])}{" ..." if len(names) > 4 else ""}

# or: AutoModelForImageClassification.from_pretrained("{repo}") with AutoImageProcessor.from_pretrained("{repo}")'''
    hub.save_training_card(
        args.output_dir,
        title=f"{'Bi-tuning' if bi else 'Fine-tuning'} of {args.pretrained_model_name_or_path} on {args.dataset}",
        base_model=args.pretrained_model_name_or_path, dataset=args.dataset, last_logs=last_logs,
        metrics={"held-out accuracy (last step)": f"{metrics['eval_accuracy']:.4f}",
                 "held-out mean per-class accuracy (last step)": f"{metrics['eval_mean_class_accuracy']:.4f}"},
        image="confusion_matrix.png", image_heading="Held-out confusion matrix", library_name="transformers",
        pipeline_tag="image-classification",
        tags=["image-classification", "bi-tuning" if bi else "standard-fine-tuning"],
        description=description, hyperparameters=hyper, usage=usage,
    )


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
