"""Speed ratios of train_diff_tuning_dit.py, all measured in one run on one machine (CPU or GPU).

    python -m benchmarks.speed --pipeline demo_out/source --dataset demo_out/digits --resolution 16
    python -m benchmarks.speed --dit_xl --dataset digits_folder --resolution 256 --mixed_precision bf16  # GPU

A step's time is the mean interval between optimisation steps inside one run (CUDA synchronised), after
`WARMUP` steps, so start-up, data caching, memory-bank loading and the final save do not count. Each run is a
fresh call of the training script's `main`.
Measured:
- Diff-Tuning step / standard fine-tuning step, same model and batch, both on cached latents (target <= 1.05);
- standard step encoding with the VAE every step / standard step on cached latents;
- memory-bank generation (`utils.memory_bank.generate_shards`, which also VAE-encodes and stores) / calling the
  stock DiTPipeline directly for the same samples.
"""

import argparse
import gc
import os
import sys
import tempfile
import time

import torch
from diffusers import DDIMScheduler, DiTPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_diff_tuning_dit as script  # noqa: E402
from fixtures.in_process import run_script  # noqa: E402
from fixtures.small_dit import build_pipeline  # noqa: E402
from utils.memory_bank import DiTBankSampler, generate_shards  # noqa: E402
from utils.training import precision_dtype  # noqa: E402

WARMUP = 5  # steps not timed: allocator, kernel selection, data-loader start


def timed_run(argv, steps):
    """Run the training script for WARMUP + 1 + `steps` steps; return (seconds per step, peak CUDA bytes or None)."""
    gc.collect()  # the previous run's model and optimizer must not count towards this run's peak
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps, real_end_of_step = [], script.end_of_step

    def end_of_step(*a, **kw):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return real_end_of_step(*a, **kw)

    script.end_of_step = end_of_step
    try:
        run_script(script, [*argv, "--max_train_steps", str(WARMUP + 1 + steps)])
    finally:
        script.end_of_step = real_end_of_step
    return (stamps[-1] - stamps[WARMUP]) / steps, torch.cuda.max_memory_allocated() if cuda else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="DiTPipeline folder (e.g. the demo's source model).")
    src.add_argument("--dit_xl", action="store_true",
                     help="Build DiT-XL/2 (28 blocks of width 1152) and an SD-sized VAE with random weights: "
                          "the compute of facebook/DiT-XL-2-256 without a download (step times do not depend on "
                          "weight values).")
    p.add_argument("--dataset", required=True, help="Image-folder data set.")
    p.add_argument("--resolution", type=int, default=16, help="Training resolution.")
    p.add_argument("--batch_size", type=int, default=32, help="Training batch.")
    p.add_argument("--steps", type=int, default=40, help="Timed steps per run (after WARMUP + 1 untimed).")
    p.add_argument("--bank_size", type=int, default=128, help="Samples for the generation benchmark.")
    p.add_argument("--bank_steps", type=int, default=50, help="DDIM steps for the generation benchmark.")
    p.add_argument("--num_workers", type=int, default=0, help="--dataloader_num_workers of the training runs.")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="Of the training runs.")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="speed-")
    if a.dit_xl:
        a.pipeline = f"{tmp}/dit-xl"
        build_pipeline(resolution=256, vae_channels=(128, 256, 512, 512), hidden=(16, 72), layers=28,
                       vae_layers_per_block=2).save_pretrained(a.pipeline)
    base = ["--pretrained_model_name_or_path", a.pipeline, "--dataset", a.dataset, "--resolution",
            str(a.resolution), "--train_batch_size", str(a.batch_size), "--validation_steps", "0",
            "--num_validation_images", "1", "--validation_inference_steps", "1", "--checkpointing_steps", "100000",
            "--report_to", "none", "--no-random_flip", "--skip_image_check", "--dataloader_num_workers",
            str(a.num_workers), "--mixed_precision", a.mixed_precision,
            "--memory_bank", f"{tmp}/bank", "--memory_bank_size", "256", "--memory_bank_inference_steps", "10"]
    # Warm-up: builds the latent cache and the memory bank once for all runs.
    timed_run([*base, "--output_dir", f"{tmp}/warm", "--cache_latents"], 1)

    # Standard steps are timed before and after the Diff-Tuning steps; their spread shows the timing noise.
    standard_before, std_peak = timed_run([*base, "--method", "standard", "--cache_latents", "--output_dir",
                                           f"{tmp}/std-c"], a.steps)
    diff_cached, dt_peak = timed_run([*base, "--method", "diff_tuning", "--cache_latents", "--output_dir",
                                      f"{tmp}/dt-c"], a.steps)
    standard_after, _ = timed_run([*base, "--method", "standard", "--cache_latents", "--output_dir",
                                   f"{tmp}/std-c2"], a.steps)
    standard_cached = (standard_before + standard_after) / 2
    standard_encode, _ = timed_run([*base, "--method", "standard", "--output_dir", f"{tmp}/std-e"], a.steps)

    pipe = DiTPipeline.from_pretrained(a.pipeline)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    # Under the runs' mixed precision, as the training script generates its bank.
    dtype = precision_dtype(a.mixed_precision) if a.mixed_precision != "no" else None
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        start = time.perf_counter()
        generate_shards(DiTBankSampler(pipe, num_inference_steps=a.bank_steps), f"{tmp}/gen", a.bank_size,
                        batch_size=32, show_progress=False)
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

    print(f"\ndevice: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, batch {a.batch_size}, "
          f"resolution {a.resolution}, {a.steps} timed steps per run, data-loader workers {a.num_workers}, "
          f"mixed precision {a.mixed_precision}")
    print("| measurement | value |\n|---|---|")
    print(f"| standard step, cached latents (before / after the Diff-Tuning runs) | {1000 * standard_before:.1f} / "
          f"{1000 * standard_after:.1f} ms |")
    print(f"| Diff-Tuning step, cached latents | {1000 * diff_cached:.1f} ms |")
    print(f"| **Diff-Tuning / standard** (target <= 1.05) | **{diff_cached / standard_cached:.3f}** |")
    print(f"| standard step, VAE every step | {1000 * standard_encode:.1f} ms |")
    print(f"| **VAE every step / cached latents** | **{standard_encode / standard_cached:.3f}** |")
    print(f"| memory bank: {a.bank_size} samples x {a.bank_steps} DDIM steps, ours | {ours:.2f} s |")
    print(f"| same samples, stock DiTPipeline | {direct:.2f} s |")
    print(f"| **bank generation / stock pipeline** | **{ours / direct:.3f}** |")
    if std_peak is not None:
        print(f"| peak CUDA memory, standard / Diff-Tuning (cached latents) | {std_peak / 2**30:.2f} / "
              f"{dt_peak / 2**30:.2f} GiB |")
        print(f"| **Diff-Tuning / standard peak memory** | **{dt_peak / std_peak:.3f}** |")


if __name__ == "__main__":
    main()
