"""Memory banks: samples of the pre-trained model, stored as a `datasets` dataset (Diff-Tuning's retention data).

What a row holds depends on the generator (a "bank sampler" here):
- `DiTBankSampler` (class-conditional DiT): the generated `image` (PNG), the `class_label` and `seed` that
  generated it, and the VAE posterior of the image and of its mirror image (`latent_moments`,
  `latent_moments_flipped`).
- `ControlBankSampler` (Stable Diffusion, for ControlNet): the generated `image`, its `conditioning_image` annotated
  by the run's annotator, the `text` prompt, the `seed`, and `latent_moments`.
Moments are mean and log-variance stacked on the channel axis (diffusers' `latent_dist.parameters`, unscaled);
training samples a latent from them exactly as `vae.encode(x).latent_dist.sample()` would, so it never runs the VAE
on the bank.

Generation is sharded: shard k holds samples k*B .. (k+1)*B-1, each written atomically to `<bank>.partial/`, so an
interrupted run keeps what it wrote and continues; sample i always uses seed + i, so the bank does not depend on
the batch size or the number of processes. The finished bank is moved into place in one rename, with
`memory_bank.json`: the generator's settings, which a training run compares with its own before using the bank.

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
from huggingface_hub import DatasetCard, DatasetCardData
from PIL import Image
from tqdm.auto import tqdm

from . import hub
from .errors import UserError
from .latents import encode_moments, vae_scale_factor
from .outputs import created_by, mark, replace_dir, work_dir, write_json_atomically
from .sampling import seeded_generators

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


def _as_uint8(images: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Pipeline output in [0, 1] as the uint8 pixels a PNG holds, and those pixels in [-1, 1] for the VAE."""
    images = (images * 255).round().astype(np.uint8)
    return images, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def is_memory_bank(path) -> bool:
    return path is not None and os.path.exists(os.path.join(path, CONFIG_NAME))


def class_pool(pipeline: DiTPipeline) -> list[int]:
    """Classes to sample from: the pipeline's named classes (e.g. ImageNet's 1000), else every label row."""
    if pipeline.labels:
        return sorted(set(pipeline.labels.values()))
    return list(range(pipeline.transformer.config.num_embeds_ada_norm))


class DiTBankSampler:
    """Bank rows of a class-conditional DiTPipeline: random classes (of its named ones), CFG, DDIM as the official
    sampler. `sampler(seeds)` -> the columns of those rows."""

    def __init__(self, pipeline: DiTPipeline, guidance_scale: float = 1.5, num_inference_steps: int = 50):
        self.pipeline, self.guidance_scale, self.num_inference_steps = pipeline, guidance_scale, num_inference_steps
        # DDIM as in the official sampler; the pipeline keeps its own scheduler untouched.
        self.sampler = DiTPipeline(transformer=pipeline.transformer, vae=pipeline.vae,
                                   scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
        self.sampler.set_progress_bar_config(disable=True)
        cfg = pipeline.transformer.config
        self.latent_shape = (2 * cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.pool = class_pool(pipeline)
        self.model = pipeline.transformer
        self.settings = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps}

    @property
    def features(self) -> datasets.Features:
        return datasets.Features({
            "image": datasets.Image(), "class_label": datasets.Value("int64"), "seed": datasets.Value("int64"),
            "latent_moments": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
            "latent_moments_flipped": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
        })

    def __call__(self, seeds: list[int]) -> dict:
        device = self.model.device
        labels = [self.pool[np.random.default_rng(s).integers(len(self.pool))] for s in seeds]
        images = self.sampler(class_labels=labels, guidance_scale=self.guidance_scale,
                              num_inference_steps=self.num_inference_steps,
                              generator=seeded_generators(seeds, device),
                              output_type="np").images
        images, pixels = _as_uint8(images)  # exactly what a PNG of the sample holds
        moments, moments_flipped = encode_moments(self.pipeline.vae, pixels)
        return {"image": list(images), "class_label": labels, "seed": seeds,
                "latent_moments": moments.cpu().numpy(), "latent_moments_flipped": moments_flipped.cpu().numpy()}


class ControlBankSampler:
    """Bank rows of a text-to-image Stable Diffusion pipeline for ControlNet Diff-Tuning: samples of one prompt (the
    paper's "a high-quality, detailed, and professional image"), each with its control annotated from the
    generated image by the run's annotator. `sampler(seeds)` -> the columns of those rows."""

    def __init__(self, pipeline, annotator, prompt: str, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                 resolution: int = 512):
        from diffusers import StableDiffusionPipeline

        self.pipeline, self.annotator, self.prompt, self.resolution = pipeline, annotator, prompt, resolution
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self.sampler = StableDiffusionPipeline(
            vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer, unet=pipeline.unet,
            scheduler=DDIMScheduler.from_config(pipeline.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        self.sampler.set_progress_bar_config(disable=True)
        factor = vae_scale_factor(pipeline.vae)
        self.latent_shape = (2 * pipeline.vae.config.latent_channels, resolution // factor, resolution // factor)
        self.model = pipeline.unet
        self.settings = {"prompt": prompt, "guidance_scale": guidance_scale,
                         "num_inference_steps": num_inference_steps, "resolution": resolution,
                         "annotator": annotator.settings}

    @property
    def features(self) -> datasets.Features:
        return datasets.Features({
            "image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "latent_moments": datasets.Array3D(shape=self.latent_shape, dtype="float32"),
        })

    def __call__(self, seeds: list[int]) -> dict:
        device = self.model.device
        images = self.sampler([self.prompt] * len(seeds), height=self.resolution, width=self.resolution,
                              guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                              generator=seeded_generators(seeds, device),
                              output_type="np").images
        images, pixels = _as_uint8(images)
        moments, _ = encode_moments(self.pipeline.vae, pixels)
        controls = [self.annotator(Image.fromarray(img)) for img in images]
        return {"image": list(images), "conditioning_image": controls, "text": [self.prompt] * len(seeds),
                "seed": seeds, "latent_moments": moments.cpu().numpy()}


def generate_shards(
    sampler,
    bank_dir: str,
    size: int,
    batch_size: int = 32,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
) -> None:
    """Generate this process's shards (k = process_index, process_index + num_processes, ...), skipping done ones.
    `sampler(seeds)` gives the columns of the rows with those seeds (`DiTBankSampler`, `ControlBankSampler`)."""
    if size < 1 or batch_size < 1:
        raise UserError(f"memory bank size and batch size must be >= 1, got {size} and {batch_size}")
    check_bank_dir(bank_dir)
    shard_dir = shard_dir_of(bank_dir)
    mark(shard_dir, SCRIPT)

    mine = list(range(process_index, math.ceil(size / batch_size), num_processes))
    todo = [k for k in mine if not os.path.exists(os.path.join(shard_dir, f"shard-{k:06d}"))]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="memory bank", disable=not show_progress)
    was_training = sampler.model.training
    sampler.model.eval()  # in train mode every DiT block would drop labels at random
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar for the bank, not one per shard written
    for k in todo:
        seeds = list(range(seed + k * batch_size, seed + min((k + 1) * batch_size, size)))
        shard = datasets.Dataset.from_dict(sampler(seeds), features=sampler.features)
        path = os.path.join(shard_dir, f"shard-{k:06d}")
        shard.save_to_disk(path + ".tmp")
        os.replace(path + ".tmp", path)
        bar.update(1)
    bar.close()
    if bars_were_on:
        datasets.enable_progress_bars()
    sampler.model.train(was_training)


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


def build_memory_bank(accelerator, sampler, bank_dir, size, info: dict, batch_size: int = 32, seed: int = 0):
    """Generate the bank across all processes unless it exists, and return it. `info` (the base model and what
    else the run checks) is recorded in memory_bank.json with the sampler's settings, the batch size and seed."""
    if not is_memory_bank(bank_dir):
        generate_shards(sampler, bank_dir, size, batch_size=batch_size, seed=seed,
                        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                        show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finalize(bank_dir, size, {**info, **sampler.settings, "batch_size": batch_size, "seed": seed})
        accelerator.wait_for_everyone()
    return load_memory_bank(bank_dir, sampler.latent_shape)


def check_bank_settings(bank_dir: str, expected: dict) -> None:
    """Refuse, in one line, a bank whose recorded settings differ from the run's (another base model, condition,
    annotator setting or resolution would teach the model someone else's samples)."""
    recorded = bank_info(bank_dir)
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise UserError(f"memory bank {bank_dir} was made with {key} = {recorded.get(key)!r}, but this run has "
                            f"{value!r}; use a bank made for this run, or a new --memory_bank folder")


def memory_bank_card(info: dict) -> DatasetCard:
    """Dataset card of a memory bank: what generated it and how to use it."""
    data = DatasetCardData(tags=["diff-tuning", "memory-bank", "synthetic"], size_categories=None)
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in info.items())
    return DatasetCard(f"""---
{data.to_yaml()}
---

# Diff-Tuning memory bank of {info.get("base_model")}

Samples of the pre-trained pipeline `{info.get("base_model")}`, generated for Diff-Tuning
([Zhong et al., 2024](https://arxiv.org/abs/2406.00773)): each row holds the generated `image` with what generated
it (the `class_label` or the prompt `text`, and the `seed`), the control annotated from it for ControlNet banks
(`conditioning_image`), and the VAE posterior of the image (`latent_moments`, and of its mirror image for DiT
banks: mean and log-variance stacked on the channel axis, unscaled).

| generation setting | value |
|---|---|
{rows}

To reuse it: `datasets.load_dataset("<this repo>", split="train").save_to_disk("bank")`, download
`memory_bank.json` from this repo into `bank/`, then pass `--memory_bank bank` to the training script.
""")


def push_memory_bank(bank_dir: str, repo_id: str, token: str | None, private: bool = False) -> str:
    """Push a memory bank as a Hub dataset with its own card and generation settings. Returns the repo id."""
    token = hub.resolve_token(token)
    repo_id = hub.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private, token=token).repo_id
    datasets.load_from_disk(bank_dir).push_to_hub(repo_id, token=token, private=private)
    memory_bank_card(bank_info(bank_dir)).push_to_hub(repo_id, repo_type="dataset", token=token)
    hub.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=bank_dir, allow_patterns=[CONFIG_NAME],
                  token=token, commit_message="Add memory-bank generation settings")
    return repo_id


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

    from .training import precision_dtype

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    dtype = precision_dtype(args.mixed_precision)
    pipeline = DiTPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=dtype)
    pipeline.to(accelerator.device)
    sampler = DiTBankSampler(pipeline, args.guidance_scale, args.num_inference_steps)
    bank = build_memory_bank(accelerator, sampler, args.output_dir, args.size,
                             {"base_model": args.pretrained_model_name_or_path}, args.batch_size, args.seed)
    accelerator.print(f"memory bank {args.output_dir}: {len(bank)} samples")


if __name__ == "__main__":
    import sys

    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
