"""Speed ratios of train_diff_tuning_dit.py, all measured in one run on one machine (CPU or GPU).

    python -m benchmarks.speed --pipeline demo_out/source --dataset demo_out/digits --resolution 16

A step's time is (time of a 2K-step run - time of a K-step run) / K, so start-up, loading and saving cancel out.
Measured:
- Diff-Tuning step / standard fine-tuning step, same model and batch, both on cached latents (target <= 1.05);
- standard step encoding with the VAE every step / standard step on cached latents;
- memory-bank generation (`utils.memory_bank.generate_shards`, which also VAE-encodes and stores) / calling the
  stock DiTPipeline directly for the same samples.
"""

import argparse
import os
import sys
import tempfile
import time

import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import DDIMScheduler, DiTPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_diff_tuning_dit as script  # noqa: E402
from utils.memory_bank import generate_shards  # noqa: E402


def run_seconds(argv):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    start = time.perf_counter()
    script.main(script.parse_args(argv))
    return time.perf_counter() - start


def step_seconds(base_argv, out, steps):
    short = run_seconds([*base_argv, "--output_dir", f"{out}-a", "--max_train_steps", str(steps)])
    long = run_seconds([*base_argv, "--output_dir", f"{out}-b", "--max_train_steps", str(2 * steps)])
    return (long - short) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="DiTPipeline folder (e.g. the demo's source model).")
    p.add_argument("--dataset", required=True, help="Image-folder data set.")
    p.add_argument("--resolution", type=int, default=16, help="Training resolution.")
    p.add_argument("--batch_size", type=int, default=32, help="Training batch.")
    p.add_argument("--steps", type=int, default=40, help="K: runs of K and 2K steps are timed.")
    p.add_argument("--bank_size", type=int, default=128, help="Samples for the generation benchmark.")
    p.add_argument("--bank_steps", type=int, default=50, help="DDIM steps for the generation benchmark.")
    p.add_argument("--num_workers", type=int, default=0, help="--dataloader_num_workers of the training runs.")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="speed-")
    base = ["--pretrained_model_name_or_path", a.pipeline, "--dataset", a.dataset, "--resolution",
            str(a.resolution), "--train_batch_size", str(a.batch_size), "--validation_steps", "0",
            "--num_validation_images", "1", "--validation_inference_steps", "1", "--checkpointing_steps", "100000",
            "--report_to", "none", "--no-random_flip", "--skip_image_check", "--dataloader_num_workers",
            str(a.num_workers),
            "--memory_bank", f"{tmp}/bank", "--memory_bank_size", "256", "--memory_bank_inference_steps", "10"]
    # Warm-up: builds the latent cache and the memory bank, so that no timed run pays for them.
    run_seconds([*base, "--output_dir", f"{tmp}/warm", "--max_train_steps", "1", "--cache_latents"])

    standard_cached = step_seconds([*base, "--method", "standard", "--cache_latents"], f"{tmp}/std-c", a.steps)
    diff_cached = step_seconds([*base, "--method", "diff_tuning", "--cache_latents"], f"{tmp}/dt-c", a.steps)
    standard_encode = step_seconds([*base, "--method", "standard"], f"{tmp}/std-e", a.steps)

    pipe = DiTPipeline.from_pretrained(a.pipeline)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    start = time.perf_counter()
    generate_shards(pipe, f"{tmp}/gen", a.bank_size, num_inference_steps=a.bank_steps, batch_size=32,
                    show_progress=False)
    ours = time.perf_counter() - start
    stock = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae,
                        scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    for i in range(0, a.bank_size, 32):
        n = min(32, a.bank_size - i)
        stock(class_labels=list(range(n)), guidance_scale=1.5, num_inference_steps=a.bank_steps,
              generator=[torch.Generator(device).manual_seed(i + j) for j in range(n)], output_type="np")
    direct = time.perf_counter() - start

    print(f"\ndevice: {device}, batch {a.batch_size}, resolution {a.resolution}, K = {a.steps}, "
          f"data-loader workers {a.num_workers}")
    print("| measurement | value |\n|---|---|")
    print(f"| standard step, cached latents | {1000 * standard_cached:.1f} ms |")
    print(f"| Diff-Tuning step, cached latents | {1000 * diff_cached:.1f} ms |")
    print(f"| **Diff-Tuning / standard** (target <= 1.05) | **{diff_cached / standard_cached:.3f}** |")
    print(f"| standard step, VAE every step | {1000 * standard_encode:.1f} ms |")
    print(f"| **VAE every step / cached latents** | **{standard_encode / standard_cached:.3f}** |")
    print(f"| memory bank: {a.bank_size} samples x {a.bank_steps} DDIM steps, ours | {ours:.2f} s |")
    print(f"| same samples, stock DiTPipeline | {direct:.2f} s |")
    print(f"| **bank generation / stock pipeline** | **{ours / direct:.3f}** |")


if __name__ == "__main__":
    main()
