"""The training conventions every script shares, as in diffusers' examples: the optimisation and output flags,
the Accelerator, the optimizer and lr schedule, EMA weights for sampling, and image logging."""

import argparse
import gc
import glob
import importlib.util
import math
import os
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from PIL import Image

from .checkpointing import list_checkpoints, save_checkpoint
from .errors import UserError
from .flags import flag_of

# diffusers' schedules that need nothing beyond warm-up and total steps (piecewise_constant needs step rules)
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
# --report_to value -> the package accelerate needs for it
TRACKER_PACKAGES = {name: name for name in ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive",
                                            "swanlab", "trackio")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in --help, except where the help already says what the default is (a computed one such as
    "default: the model's"), which would otherwise print it twice."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def add_optimisation_args(p: argparse.ArgumentParser, *, batch_size: int, batch_help: str, max_train_steps: int,
                          learning_rate: float, max_grad_norm: float | None, ema_decay: float, paper: str,
                          lr_warmup_steps: int = 0, weight_decay: float = 0.0):
    """The "optimisation" flag group; defaults are the paper's (`paper` names the setup in the help), or diffusers'
    examples' where a script trains what they train (`lr_warmup_steps` 500, `weight_decay` 1e-2)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=batch_size, help=batch_help)
    add_run_length_args(g, max_train_steps, f"Optimizer steps ({paper}).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--learning_rate", type=float, default=learning_rate, help=f"Adam learning rate ({paper}).")
    g.add_argument("--scale_lr", action="store_true", help="Multiply the lr by accumulation x batch x processes.")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers lr schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=lr_warmup_steps, help="Warm-up steps of the lr scheduler.")
    add_lr_shape_args(g)
    g.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=weight_decay, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="Gradient clipping norm (none: off).")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; it is what gets saved.")
    g.add_argument("--ema_decay", type=float, default=ema_decay, help="EMA decay.")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Mixed precision (default: accelerate config).")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (CUDA).")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument("--seed", type=int, default=0, help="Seed of every random choice; runs are reproducible.")
    return g


def add_run_length_args(g, max_train_steps: int, help: str) -> None:
    """--max_train_steps, or diffusers' and transformers' --num_train_epochs instead (one of the two)."""
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max_train_steps", type=int, default=max_train_steps, help=help)
    length.add_argument("--num_train_epochs", type=int, default=None,
                        help="Train for this many passes over the training data instead of --max_train_steps (the "
                             "step count is derived from the data, the batch, the accumulation and the processes).")


def steps_or_epoch(value: str):
    """--checkpointing_steps: a number of optimizer steps, or 'epoch' (after every pass over the data)."""
    if value == "epoch":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'epoch', got {value!r}") from None


class RunLength(NamedTuple):
    """How long a run is, in optimizer steps, once the data is known (`run_length`)."""
    max_train_steps: int  # --max_train_steps, or --num_train_epochs x steps_per_epoch
    checkpointing_steps: int  # --checkpointing_steps, or steps_per_epoch for 'epoch'
    steps_per_epoch: int  # optimizer steps of one pass over the training data by every process


def run_length(args, batches_per_epoch: int, num_processes: int) -> RunLength:
    """The run's length from the flags and the training loader's batches per pass (before `prepare`), counted as
    diffusers' examples do: the batches are split over the processes, then grouped by the accumulation."""
    per_process = math.ceil(batches_per_epoch / num_processes)
    steps_per_epoch = max(1, math.ceil(per_process / args.gradient_accumulation_steps))
    total = args.max_train_steps if args.num_train_epochs is None else args.num_train_epochs * steps_per_epoch
    every = steps_per_epoch if args.checkpointing_steps == "epoch" else args.checkpointing_steps
    return RunLength(total, every, steps_per_epoch)


def add_lr_shape_args(g) -> None:
    """diffusers' --lr_num_cycles and --lr_power, for the schedules that take them."""
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")


def add_output_args(p: argparse.ArgumentParser, *, checkpointing_steps: int, validation_steps: int,
                    validation_help: str = "Sample a validation grid every N steps (0: never).", sampling: bool = True,
                    num_validation_images: int = 8):
    """Checkpoints, validation, logging and Hub flags (a script adds its own validation options to the group);
    `sampling`: the validation-grid flags of a generative model."""
    g = p.add_argument_group("checkpoints, validation, logging, Hub")
    g.add_argument("--checkpointing_steps", type=steps_or_epoch, default=checkpointing_steps,
                   help="Save resumable state every N optimizer steps, or 'epoch': after every pass over the data.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest' in output_dir.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Train again from step 0 into an output folder that holds a finished run of this script "
                        "(refused otherwise, so that a rerun never silently replaces earlier results).")
    g.add_argument("--validation_steps", type=int, default=validation_steps, help=validation_help)
    if sampling:
        g.add_argument("--num_validation_images", type=int, default=num_validation_images,
                       help="Images per validation grid (per validation prompt where there are prompts).")
        g.add_argument("--validation_inference_steps", type=int, default=50,
                       help="DDIM steps of validation samples.")
    g.add_argument("--report_to", default="tensorboard", choices=sorted(TRACKER_PACKAGES) + ["all", "none"],
                   help="Where to log: a tracker (its package must be installed), all installed ones, or none.")
    g.add_argument("--logging_dir", default="logs", help="Log folder, relative to the output folder.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the output folder (no checkpoints, no logs).")
    g.add_argument("--hub_model_id", default=None, help="Repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return g


def check_common_args(args, positive=(), finished: str = "README.md"):
    """Flags of the shared groups (and `positive` others) that cannot work, caught before anything loads; and a
    rerun into a finished output (`finished`: a glob, relative to --output_dir, of what a finished run wrote last)
    without --resume_from_checkpoint or --overwrite_output_dir."""
    if (glob.glob(os.path.join(args.output_dir, finished)) and not args.resume_from_checkpoint
            and not args.overwrite_output_dir):
        raise UserError(f"--output_dir {args.output_dir} holds a finished run; pass --resume_from_checkpoint latest to "
                        "continue it, --overwrite_output_dir to train it again from step 0, or choose a new folder")
    for name in ("train_batch_size", "max_train_steps", "num_train_epochs", "gradient_accumulation_steps",
                 "checkpointing_steps", "num_validation_images", "validation_inference_steps", *positive):
        if getattr(args, name, None) not in (None, "epoch") and getattr(args, name) < 1:
            raise UserError(f"{flag_of(args, name)} must be >= 1, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise UserError(f"{flag_of(args, 'learning_rate')} must be > 0, got {args.learning_rate}")
    if args.validation_steps is not None and args.validation_steps < 0:
        raise UserError(f"--validation_steps must be >= 0 (0: never), got {args.validation_steps}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UserError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.lr_warmup_steps < 0:
        raise UserError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if getattr(args, "dataloader_num_workers", 0) < 0:
        raise UserError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.lr_num_cycles < 1:
        raise UserError(f"--lr_num_cycles must be >= 1, got {args.lr_num_cycles}")
    package = TRACKER_PACKAGES.get(args.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--report_to {args.report_to} needs the {package} package (pip install {package}); "
                        "or use --report_to tensorboard or none")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU (fp16 autocast is GPU-only); use bf16 on CPU")
    xformers = getattr(args, "enable_xformers_memory_efficient_attention", False)
    if xformers and not torch.cuda.is_available():
        raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; xformers has no CPU kernels")
    if xformers and importlib.util.find_spec("xformers") is None:
        raise UserError("--enable_xformers_memory_efficient_attention needs the xformers package "
                        "(pip install xformers); PyTorch's own attention is used without the flag")


def make_accelerator(args, project_dir: str, logging_dir: str) -> Accelerator:
    accelerator = Accelerator(
        # Our loaders cycle forever (utils.infra.data.ResumableLoader): an epoch's end must not force an early optimizer
        # step, or an accumulation would hold fewer micro-batches there and a resume would count steps differently.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=logging_dir),
        # Epoch e always shuffles the same way, so a resumed run can skip to the exact batch it stopped at.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # accelerate 1.x turns on FSDP only over GPUs (or other accelerators): an FSDP config with use_cpu starts N
        # processes that each train alone and would overwrite each other's outputs
        raise UserError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
                        f"({accelerator.distributed_type.value}); FSDP and DeepSpeed need GPUs (on CPU, launch "
                        "without them: data parallel over gloo)")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def effective_learning_rate(args, num_processes: int) -> float:
    """--learning_rate, times accumulation x batch x processes under --scale_lr; computed once per run."""
    scale = args.gradient_accumulation_steps * args.train_batch_size * num_processes if args.scale_lr else 1
    return args.learning_rate * scale


def precision_dtype(mixed_precision: str | None) -> torch.dtype:
    """"fp16" / "bf16" / "no" (or None) as a torch dtype."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen models under the run's mixed precision (trained weights stay fp32)."""
    return precision_dtype(accelerator.mixed_precision)


def make_optimizer(params, args, accelerator, lr: float, max_train_steps: int, optimizer_class=None,
                   **optimizer_options):
    """AdamW (or `optimizer_class`, e.g. bitsandbytes' 8-bit AdamW or Prodigy, with its `optimizer_options`) and the
    lr schedule over the run's `max_train_steps` (scheduler steps count every process, as accelerate does)."""
    optimizer = (optimizer_class or torch.optim.AdamW)(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                                       weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                                       **optimizer_options)
    return optimizer, lr_schedule(optimizer, args, accelerator.num_processes, max_train_steps)


def lr_schedule(optimizer, args, num_processes: int, max_train_steps: int):
    """diffusers' schedule `--lr_scheduler` over `max_train_steps`, with --lr_warmup_steps, --lr_num_cycles and
    --lr_power (a prepared scheduler steps once per process per optimizer step: counts scale with the processes)."""
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)


def apply_gradients(accelerator, model, loss, optimizer, lr_scheduler, max_grad_norm: float | None, *, step: int,
                    output_dir: str, set_to_none: bool = True):
    """Stop on a non-finite loss (every process at once; `step` is the optimizer step being computed), then
    backward, clip and step. Call inside `accelerator.accumulate(model)`: the prepared optimizer and scheduler only
    step on the micro-batch that completes an accumulation, which is also the only one clipped. `model`: the module
    whose gradients are clipped, or a list of the parameters (e.g. a UNet's and its text encoders' adapters)."""
    check_finite_loss(accelerator, loss, step, output_dir)
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters() if hasattr(model, "parameters") else model, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)


def make_ema(model, decay: float, accelerator) -> EMAModel:
    """EMA of `model`'s trainable weights, on the accelerator's device and saved with every checkpoint."""
    ema = EMAModel(model.parameters(), decay=decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def true_or_false(text: str) -> bool:
    """argparse type of diffusers' boolean flags (theirs is `type=bool`, which reads "False" as true)."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def log_running_training(log, *, examples: int, batch_size: int, num_processes: int, accumulation: int,
                         length: RunLength, first_step: int = 0, **more) -> None:
    """diffusers' examples' "***** Running training *****" block, with what else the run's batch holds (`more`,
    e.g. the bank and data rows of a micro-batch), before the first step."""
    epochs = math.ceil(length.max_train_steps / length.steps_per_epoch)
    lines = ["***** Running training *****", f"  Num examples = {examples}", f"  Num Epochs = {epochs}",
             f"  Instantaneous batch size per device = {batch_size}",
             f"  Total train batch size (w. parallel, distributed & accumulation) = "
             f"{batch_size * num_processes * accumulation}",
             f"  Gradient Accumulation steps = {accumulation}",
             f"  Total optimization steps = {length.max_train_steps}"
             + (f" (resuming at step {first_step})" if first_step else ""),
             *(f"  {name.replace('_', ' ').capitalize()} = {value}" for name, value in more.items())]
    log.info("\n".join(lines))


def log_step(accelerator, progress, logs: dict, step: int) -> None:
    """After optimizer step `step`: the progress bar (loss and, where logged, lr, as diffusers' examples show) and
    the trackers."""
    progress.update(1)
    progress.set_postfix(loss=f"{logs['loss']:.4f}", **({"lr": f"{logs['lr']:.3g}"} if "lr" in logs else {}))
    accelerator.log(logs, step=step)


def checkpoint(accelerator, model, step: int, output_dir: str, total_limit: int | None, identity: dict, log,
               save_extra=None) -> None:
    """Save the resumable state as checkpoint-<step> (never a state with non-finite weights; `save_extra(folder)`
    adds to the checkpoint before it is complete; `identity`: the run it belongs to, checked on resume)."""
    check_finite_weights(accelerator, model, step, output_dir)
    if accelerator.is_main_process:
        path = save_checkpoint(accelerator, output_dir, step, total_limit, save_extra, identity)
        log.info(f"saved state to {path}")


def divergence_error(what: str, step: int, output_dir: str) -> UserError:
    """The one line a diverged run ends with: what went non-finite, at which step, and the latest good state."""
    found = list_checkpoints(output_dir)
    last = (f"the latest good state is {found[-1]} (--resume_from_checkpoint latest)" if found
            else "no checkpoint was written")
    return UserError(f"{what} is not finite at step {step}: training diverged (lower --learning_rate or set "
                     f"--max_grad_norm); nothing was saved, {last}")


def _all_processes_agree(accelerator, ok: bool) -> bool:
    """True only if `ok` holds on every process (each must take the same branch, or the others would hang in the
    next collective)."""
    flag = torch.tensor([float(ok)], device=accelerator.device)
    return bool(accelerator.gather(flag).min() > 0) if accelerator.num_processes > 1 else ok


def check_finite_loss(accelerator, loss: torch.Tensor, step: int, output_dir: str):
    """Stop before the backward pass of a non-finite loss, on every process at once (`step`: the optimizer step
    being computed)."""
    if not _all_processes_agree(accelerator, bool(torch.isfinite(loss.detach()).all())):
        raise divergence_error(f"the loss ({loss.detach().float().mean().item():g} on one process)", step, output_dir)


def weights_are_finite(model) -> bool:
    """Every floating-point parameter and buffer (BatchNorm's running statistics too) is finite."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def check_finite_weights(accelerator, model, step: int, output_dir: str):
    """Refuse to checkpoint or save weights or buffers with a NaN or infinity (a finite loss can still take a huge
    step; a BatchNorm's running statistics can go NaN while every parameter stays finite)."""
    if not _all_processes_agree(accelerator, weights_are_finite(model)):
        raise divergence_error("a weight or buffer of the model", step, output_dir)


def end_training(accelerator) -> None:
    """Finish the trackers and end the process group, in an order that cannot hang.

    A DDP wrapper's reducer holds a reference to the gloo/NCCL group; if the wrapper is the last to let go (after
    `destroy_process_group`), the group's destructor runs while the GIL is held and joins a worker thread that
    needs the GIL to free a tensor of an earlier all-gather: a deadlock at exit, seen here under load with two CPU
    processes (pytorch/pytorch#56297). So the caller deletes its prepared model first, accelerate drops its own
    references here, and the group is destroyed while it is still registered."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def tracker_config(args) -> dict:
    """The flags worth logging; never the token."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}


@contextmanager
def averaged_weights(model, ema):
    """Sample with the EMA weights (if any) in eval mode, then go back to the training weights."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        model.train()
        if ema is not None:
            ema.restore(model.parameters())


def upscale(image: Image.Image, min_size: int) -> Image.Image:
    """`image` enlarged by a whole factor (nearest neighbour: no invented detail) to at least `min_size` pixels."""
    factor = max(1, math.ceil(min_size / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def image_grid(images: np.ndarray, cols: int = 8, min_tile: int = 64) -> Image.Image:
    """NHWC images in [0, 1] as one grid, the last row padded with black; tiles smaller than `min_tile` pixels are
    upscaled (nearest neighbour) so that a person can see them."""
    cols = min(len(images), cols)
    rows = math.ceil(len(images) / cols)
    padded = np.concatenate([images, np.zeros((rows * cols - len(images), *images.shape[1:]))])
    tiles = [upscale(Image.fromarray((img * 255).round().astype(np.uint8)), min_tile) for img in padded]
    return make_image_grid(tiles, rows=rows, cols=cols)


def log_images(accelerator, tag: str, images: np.ndarray, step: int, captions: list[str] | None = None):
    """NHWC images in [0, 1] to every configured tracker that shows images (TensorBoard, wandb; the others log
    scalars only)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image((img * 255).round().astype(np.uint8),
                                           caption=captions[i] if captions else None)
                               for i, img in enumerate(images)]}, step=step)


def freeze(module, device, dtype=torch.float32):
    """A frozen, eval-mode model on `device`, cast only when mixed precision asks for it (diffusers warns on every
    explicit cast)."""
    module = module.requires_grad_(False).eval().to(device)
    return module.to(dtype) if dtype != torch.float32 else module
