"""Memory banks: samples of the pre-trained model, stored as a `datasets` dataset.

Each row holds the generated `image` (PNG), the `class_label` and `seed` that generated it, and the VAE posterior of
the image and of its mirror image (`latent_moments`, `latent_moments_flipped`: mean and log-variance stacked on the
channel axis, diffusers' `latent_dist.parameters`, unscaled). Training samples a latent from them exactly as
`vae.encode(x).latent_dist.sample()` would, so it never runs the VAE on the bank.

Generation is sharded: shard k holds samples k*B .. (k+1)*B-1, each written atomically to `<bank>.partial/`, so an
interrupted run keeps what it wrote and continues; sample i always uses seed + i, so the bank does not depend on
the batch size or the number of processes. The finished bank is moved into place in one rename.

Build a bank once and reuse it across runs:
    accelerate launch -m utils.memory_bank --pretrained_model_name_or_path facebook/DiT-XL-2-256 \\
        --output_dir banks/dit-xl-5k --size 5000
"""

import argparse
import json
import math
import os
import shutil

import datasets
import numpy as np
import torch
from diffusers import DDIMScheduler, DiTPipeline
from tqdm.auto import tqdm

from .errors import UserError
from .outputs import created_by, mark, replace_dir, work_dir, write_json_atomically

CONFIG_NAME = "memory_bank.json"
SCRIPT = "utils.memory_bank"  # marks the folders it writes (utils.outputs): only those are ever replaced or removed


def shard_dir_of(bank_dir: str) -> str:
    return bank_dir.rstrip("/") + ".partial"


def check_bank_dir(bank_dir: str, flag: str = "--memory_bank") -> None:
    """Before any generation: the bank folder is a finished bank (reused), or new, or empty; and its shard folder,
    if any, was left by an interrupted generation of this module. Anything else is the user's: refused."""
    if os.path.exists(bank_dir) and not os.path.isdir(bank_dir):
        raise UserError(f"{flag} {bank_dir} is a file, not a memory bank folder")
    if os.path.isdir(bank_dir) and os.listdir(bank_dir) and not is_memory_bank(bank_dir):
        raise UserError(f"{flag} {bank_dir} exists but is not a memory bank (no {CONFIG_NAME}); name a finished bank "
                        "or a new folder")
    shards = shard_dir_of(bank_dir)
    if os.path.exists(shards) and not is_memory_bank(bank_dir) and created_by(shards) != SCRIPT:
        raise UserError(f"{shards} exists and was not written by a memory-bank generation; move it away")


def features(latent_shape) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "class_label": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "latent_moments": datasets.Array3D(shape=tuple(latent_shape), dtype="float32"),
            "latent_moments_flipped": datasets.Array3D(shape=tuple(latent_shape), dtype="float32"),
        }
    )


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior parameters of images in [-1, 1] and of their mirror images, as float32."""
    both = torch.cat([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
    moments = vae.encode(both).latent_dist.parameters.float()
    return moments.chunk(2)


def is_memory_bank(path) -> bool:
    return path is not None and os.path.exists(os.path.join(path, CONFIG_NAME))


def class_pool(pipeline: DiTPipeline) -> list[int]:
    """Classes to sample from: the pipeline's named classes (e.g. ImageNet's 1000), else every label row."""
    if pipeline.labels:
        return sorted(set(pipeline.labels.values()))
    return list(range(pipeline.transformer.config.num_embeds_ada_norm))


def generate_shards(
    pipeline: DiTPipeline,
    bank_dir: str,
    size: int,
    guidance_scale: float = 1.5,
    num_inference_steps: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
) -> None:
    """Generate this process's shards (k = process_index, process_index + num_processes, ...), skipping done ones."""
    if size < 1 or batch_size < 1:
        raise UserError(f"memory bank size and batch size must be >= 1, got {size} and {batch_size}")
    # DDIM as in the official sampler; the pipeline keeps its own scheduler untouched.
    sampler = DiTPipeline(
        transformer=pipeline.transformer,
        vae=pipeline.vae,
        scheduler=DDIMScheduler.from_config(pipeline.scheduler.config),
    )
    sampler.set_progress_bar_config(disable=True)
    pool = class_pool(pipeline)
    device = pipeline.transformer.device
    latent_channels = 2 * pipeline.transformer.config.in_channels
    latent_size = pipeline.transformer.config.sample_size
    check_bank_dir(bank_dir)
    shard_dir = shard_dir_of(bank_dir)
    mark(shard_dir, SCRIPT)

    mine = list(range(process_index, math.ceil(size / batch_size), num_processes))
    todo = [k for k in mine if not os.path.exists(os.path.join(shard_dir, f"shard-{k:06d}"))]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="memory bank", disable=not show_progress)
    was_training = pipeline.transformer.training
    pipeline.transformer.eval()  # in train mode every DiT block would drop labels at random
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar for the bank, not one per shard written
    for k in todo:
        seeds = list(range(seed + k * batch_size, seed + min((k + 1) * batch_size, size)))
        labels = [pool[np.random.default_rng(s).integers(len(pool))] for s in seeds]
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        images = sampler(
            class_labels=labels,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generators,
            output_type="np",
        ).images
        images = (images * 255).round().astype(np.uint8)  # exactly what a PNG of the sample holds
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        moments, moments_flipped = encode_moments(pipeline.vae, pixels)
        shard = datasets.Dataset.from_dict(
            {
                "image": list(images),
                "class_label": labels,
                "seed": seeds,
                "latent_moments": moments.cpu().numpy(),
                "latent_moments_flipped": moments_flipped.cpu().numpy(),
            },
            features=features((latent_channels, latent_size, latent_size)),
        )
        path = os.path.join(shard_dir, f"shard-{k:06d}")
        shard.save_to_disk(path + ".tmp")
        os.replace(path + ".tmp", path)
        bar.update(1)
    bar.close()
    if bars_were_on:
        datasets.enable_progress_bars()
    pipeline.transformer.train(was_training)


def finalize(bank_dir: str, size: int, info: dict) -> None:
    """Concatenate the shards into the bank folder (main process only), then delete the shards."""
    shard_dir = shard_dir_of(bank_dir)
    shards = sorted(d for d in os.listdir(shard_dir) if d.startswith("shard-") and not d.endswith(".tmp"))
    bank = datasets.concatenate_datasets([datasets.load_from_disk(os.path.join(shard_dir, d)) for d in shards])
    if len(bank) != size:
        raise RuntimeError(f"memory bank shards hold {len(bank)} samples, expected {size}")
    work = work_dir(bank_dir, SCRIPT)
    tmp = os.path.join(work, "bank")
    bank.save_to_disk(tmp)
    mark(tmp, SCRIPT)
    write_json_atomically(os.path.join(tmp, CONFIG_NAME), {**info, "size": size})
    replace_dir(tmp, bank_dir, SCRIPT)  # the config file marks a complete bank; it appears only now
    shutil.rmtree(work)
    shutil.rmtree(shard_dir)


def load_memory_bank(bank_dir: str, latent_shape=None) -> datasets.Dataset:
    """Load a finished bank; with `latent_shape` (2*C, h, w), fail clearly if it was made for another model."""
    if not is_memory_bank(bank_dir):
        raise UserError(f"{bank_dir} is not a finished memory bank (no {CONFIG_NAME})")
    bank = datasets.load_from_disk(bank_dir)
    shape = tuple(bank.features["latent_moments"].shape)
    if latent_shape is not None and shape != tuple(latent_shape):
        raise UserError(
            f"memory bank {bank_dir} holds latents of shape {shape} but the model expects {tuple(latent_shape)} "
            "(2 x in_channels, sample_size, sample_size): it was made for another model"
        )
    return bank


def bank_info(bank_dir: str) -> dict:
    with open(os.path.join(bank_dir, CONFIG_NAME)) as f:
        return json.load(f)


def build_memory_bank(accelerator, pipeline, bank_dir, size, base_model, **generation):
    """Generate the bank across all processes unless it exists, and return it. `generation` goes to
    `generate_shards` (guidance_scale, num_inference_steps, batch_size, seed)."""
    if not is_memory_bank(bank_dir):
        generate_shards(
            pipeline,
            bank_dir,
            size,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            show_progress=accelerator.is_local_main_process,
            **generation,
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finalize(bank_dir, size, {"base_model": base_model, **generation})
        accelerator.wait_for_everyone()
    cfg = pipeline.transformer.config
    return load_memory_bank(bank_dir, (2 * cfg.in_channels, cfg.sample_size, cfg.sample_size))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate a Diff-Tuning memory bank from a pre-trained DiTPipeline.")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="DiTPipeline Hub id or folder.")
    p.add_argument("--output_dir", required=True, help="Folder of the finished bank (a save_to_disk dataset).")
    p.add_argument("--size", type=int, default=5000, help="Number of samples (default: 5000, the paper's smallest).")
    p.add_argument("--guidance_scale", type=float, default=1.5, help="CFG scale (default: 1.5, official sampler).")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (default: 50).")
    p.add_argument("--batch_size", type=int, default=32, help="Samples per generation batch and shard (default: 32).")
    p.add_argument("--seed", type=int, default=0, help="Sample i uses seed + i (default: 0).")
    p.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="Sampling dtype (default: no)."
    )
    args = p.parse_args(argv)
    for name in ("size", "num_inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    check_bank_dir(args.output_dir, "--output_dir")
    try:  # the pipeline's index only: a missing or wrong model fails before any weights load
        index = DiTPipeline.load_config(args.pretrained_model_name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a pipeline from {args.pretrained_model_name_or_path!r}: "
                        f"{str(e).strip().splitlines()[0]}") from e
    if index.get("_class_name") != "DiTPipeline":
        raise UserError(f"{args.pretrained_model_name_or_path} is a {index.get('_class_name')}; this module generates "
                        "banks from class-conditional DiTPipelines")
    return args


def main(args):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    pipeline = DiTPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=dtype)
    pipeline.to(accelerator.device)
    bank = build_memory_bank(
        accelerator,
        pipeline,
        args.output_dir,
        args.size,
        args.pretrained_model_name_or_path,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    accelerator.print(f"memory bank {args.output_dir}: {len(bank)} samples")


if __name__ == "__main__":
    import sys

    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
