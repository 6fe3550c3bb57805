"""Speed ratios of train_diff_tuning_dit.py, train_diff_tuning_text_to_image.py and train_diff_tuning_controlnet.py,
all measured in one process on one machine (CPU or GPU).

    python -m benchmarks.speed --pipeline demo_out/source --dataset demo_out/digits --resolution 16
    python -m benchmarks.speed --small --dataset demo_out/digits          # the demo's architecture, random weights
    python -m benchmarks.speed --dit_xl --dataset digits_folder --resolution 256 --mixed_precision bf16  # GPU
    python -m benchmarks.speed --text_to_image       # a small Stable Diffusion with LoRA on captioned digits
    python -m benchmarks.speed --text_to_image --sdxl   # the same with a small SDXL
    python -m benchmarks.speed --text_to_image --sd3    # the same with a small SD3 (flow matching)
    python -m benchmarks.speed --text_to_image --flux   # the same with a small Flux (packed latents, guidance)
    python -m benchmarks.speed --controlnet [--sdxl | --sd3 | --flux]   # train_diff_tuning_controlnet.py

A step's time is the median interval between optimisation steps inside one run (CUDA synchronised), after
`WARMUP` steps, so start-up, data caching, memory-bank loading and the final save do not count. Each run is a
fresh call of the training script's `main`. The two kinds of run are interleaved (`--repeats` pairs, the order
alternating), and every ratio is reported as the median over the pairs with its range: a single pair moved by
up to 8% between runs on an idle 2-core machine.
Measured:
- Diff-Tuning step / standard fine-tuning step, same model and batch, both on cached latents (target <= 1.03:
  the split adds no FLOPs);
- standard step encoding with the VAE every step / standard step on cached latents;
- text-to-image (`--text_to_image`): Diff-Tuning step / standard step with LoRA, same model and the same rows per
  step (--batch_size: standard's data rows, Diff-Tuning's half data and half bank, since the script's
  --train_batch_size counts data rows and adds the bank's; target <= 1.03; bank rows come as stored latents, data
  rows through the VAE, so a Diff-Tuning step encodes fewer images);
- ControlNet (`--controlnet`): the same ratio for the ControlNet script (target <= 1.03; bank controls are decoded
  from the bank's PNGs and, on SD3 and Flux, VAE-encoded every step, as data controls are);
- memory-bank generation (`utils.methods.memory_bank.generate_shards`) / calling the stock DiTPipeline for the same
  samples, and against the floor of what a bank must add: the stock pipeline plus the VAE encoding of every sample
  and its mirror image (the stored latent moments). Target: at most 1.03 over that floor.
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
from diffusers import DDIMScheduler, DiTPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_diff_tuning_dit as script  # noqa: E402
from fixtures.in_process import run_script  # noqa: E402
from fixtures.small_dit import build_pipeline  # noqa: E402
from utils.diffusion.latents import encode_moments  # noqa: E402
from utils.families.dit import DiTBankSampler  # noqa: E402
from utils.infra.training import precision_dtype  # noqa: E402
from utils.methods.memory_bank import generate_shards  # noqa: E402

WARMUP = 5  # steps not timed: allocator, kernel selection, data-loader start


def timed_run(argv, steps, script=script):
    """Run the training script for WARMUP + 1 + `steps` steps; return (median seconds per step, peak CUDA bytes or
    None)."""
    gc.collect()  # the previous run's model and optimizer must not count towards this run's peak
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stamps, real_log_step = [], script.training.log_step

    def log_step(*a, **kw):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return real_log_step(*a, **kw)

    script.training.log_step = log_step
    try:
        run_script(script, [*argv, "--max_train_steps", str(WARMUP + 1 + steps)])
    finally:
        script.training.log_step = real_log_step
    # The median interval: on a shared virtual machine a few steps stall for tens of ms, which a mean would carry.
    intervals = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
    return statistics.median(intervals), torch.cuda.max_memory_allocated() if cuda else None


def fmt(values, digits=3):
    """median (min-max)"""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def small_text_to_image(a, tmp) -> tuple[str, list[str], str]:
    """A small text-to-image pipeline built from configs in tmp/sd: Stable Diffusion (UNet widths 32, 64), or with
    --sdxl SDXL, with --sd3 SD3 (4 joint-attention blocks of width 64), with --flux Flux (2 double and 2 single blocks
    of width 32). Returns (folder, the flags its runs need, its name)."""
    from fixtures.small_unet import build_flux_pipeline, build_sd3_pipeline, build_sd_pipeline, build_sdxl_pipeline

    if a.sd3:
        build_sd3_pipeline(f"{tmp}/tokenizer", resolution=a.resolution, max_length=32, num_layers=4,
                           attention_head_dim=16, num_attention_heads=4).save_pretrained(f"{tmp}/sd")
        return f"{tmp}/sd", ["--max_sequence_length", "16"], "SD3"
    if a.flux:
        build_flux_pipeline(f"{tmp}/tokenizer", resolution=a.resolution, max_length=32, num_layers=2,
                            num_single_layers=2).save_pretrained(f"{tmp}/sd")
        return f"{tmp}/sd", ["--max_sequence_length", "16"], "Flux"
    build = build_sdxl_pipeline if a.sdxl else build_sd_pipeline
    build(f"{tmp}/tokenizer", resolution=a.resolution, max_length=32, unet_channels=(32, 64)).save_pretrained(
        f"{tmp}/sd")
    return f"{tmp}/sd", [], "SDXL" if a.sdxl else "Stable Diffusion"


def interleaved_ratio(a, base, tmp, script, label, batch_flags: dict | None = None) -> None:
    """Diff-Tuning / standard step of `script` with the flags `base` (and each kind's `batch_flags`, so that both
    steps see the same number of rows), --repeats interleaved pairs, as a table."""
    batch_flags = batch_flags or {}
    timed_run([*base, *batch_flags.get("diff_tuning", []), "--output_dir", f"{tmp}/warm"], 1, script)  # the bank
    times = {"standard": [], "diff_tuning": []}
    for r in range(a.repeats):
        for kind in ("standard", "diff_tuning") if r % 2 == 0 else ("diff_tuning", "standard"):
            times[kind].append(timed_run([*base, *batch_flags.get(kind, []), "--method", kind, "--output_dir",
                                          f"{tmp}/{kind}-{r}"], a.steps, script)[0])
    ratio = [d / s for d, s in zip(times["diff_tuning"], times["standard"])]
    print(f"\n{label}, batch {a.batch_size}, resolution {a.resolution}, {a.steps} timed steps per run, mixed "
          f"precision {a.mixed_precision}; {a.repeats} interleaved repeats; median (range)\n")
    print("| measurement | value |\n|---|---|")
    print(f"| standard step | {fmt([1000 * t for t in times['standard']], 1)} ms |")
    print(f"| Diff-Tuning step | {fmt([1000 * t for t in times['diff_tuning']], 1)} ms |")
    print(f"| **Diff-Tuning / standard** (target <= 1.03) | **{fmt(ratio)}** |")


def text_to_image(a, tmp):
    """Diff-Tuning / standard step of train_diff_tuning_text_to_image.py (LoRA) on a small pipeline
    (`small_text_to_image`; SD3 and Flux by flow matching at their scripts' default densities)."""
    import train_diff_tuning_text_to_image as t2i
    from fixtures.offline_data import sklearn_digits, write_captioned_folder

    model, extra, name = small_text_to_image(a, tmp)
    data = write_captioned_folder(*sklearn_digits(), f"{tmp}/captioned", limit=256, size=a.resolution)
    base = ["--pretrained_model_name_or_path", model, "--dataset", data, "--resolution", str(a.resolution),
            "--validation_steps", "0", "--num_validation_images", "1",
            "--validation_inference_steps", "1", "--checkpointing_steps", "100000", "--report_to", "none",
            "--skip_image_check", "--mixed_precision", a.mixed_precision, "--memory_bank", f"{tmp}/t2i-bank",
            "--memory_bank_size", "64", "--memory_bank_inference_steps", "5", "--dataloader_num_workers",
            str(a.num_workers), *extra]
    # the script's --train_batch_size counts data rows and Diff-Tuning adds as many bank rows (ratio 0.5): both
    # steps see --batch_size rows only if Diff-Tuning gets half of them as data
    rows = {"standard": ["--train_batch_size", str(a.batch_size)],
            "diff_tuning": ["--train_batch_size", str(a.batch_size // 2)]}
    interleaved_ratio(a, base, f"{tmp}/t2i", t2i, f"text-to-image ({name}), LoRA rank 4", rows)


def controlnet(a, tmp):
    """Diff-Tuning / standard step of train_diff_tuning_controlnet.py on a small pipeline (`small_text_to_image`;
    Flux's ControlNet with one double and one single block), Canny controls of the digits, the tracker off during
    the timed steps (--validation_steps 0); --batch_size counts bank and data rows together, as the script does."""
    import train_diff_tuning_controlnet as cn
    from fixtures.offline_data import sklearn_digits, write_control_folder
    from utils.metrics.annotators import make_annotator

    model, extra, name = small_text_to_image(a, tmp)
    if a.flux:
        extra += ["--num_double_layers", "1", "--num_single_layers", "1"]
    data = write_control_folder(*sklearn_digits(), f"{tmp}/control", make_annotator("canny"), size=a.resolution,
                                limit=256)
    base = ["--pretrained_model_name_or_path", model, "--dataset", data, "--condition", "canny", "--resolution",
            str(a.resolution), "--train_batch_size", str(a.batch_size), "--validation_steps", "0",
            "--num_validation_samples", "2", "--num_validation_images", "1", "--validation_inference_steps", "1",
            "--checkpointing_steps", "100000", "--report_to", "none", "--skip_image_check", "--mixed_precision",
            a.mixed_precision, "--memory_bank", f"{tmp}/cn-bank", "--memory_bank_size", "64",
            "--memory_bank_inference_steps", "5", "--dataloader_num_workers", str(a.num_workers), *extra]
    interleaved_ratio(a, base, f"{tmp}/cn", cn, f"ControlNet ({name}), Canny")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="DiTPipeline folder (e.g. the demo's source model).")
    src.add_argument("--small", action="store_true",
                     help="The demo source model's architecture with random weights (step times do not depend on "
                          "weight values).")
    src.add_argument("--text_to_image", action="store_true",
                     help="Only the text-to-image ratio, on a small Stable Diffusion built here (no --dataset needed).")
    src.add_argument("--controlnet", action="store_true",
                     help="Only the ControlNet script's ratio, on a small pipeline built here (--sdxl, --sd3, --flux).")
    src.add_argument("--dit_xl", action="store_true",
                     help="Build DiT-XL/2 (28 blocks of width 1152) and an SD-sized VAE with random weights: "
                          "the compute of facebook/DiT-XL-2-256 without a download (step times do not depend on "
                          "weight values).")
    p.add_argument("--sdxl", action="store_true",
                   help="With --text_to_image: a small SDXL instead of Stable Diffusion.")
    p.add_argument("--sd3", action="store_true",
                   help="With --text_to_image or --controlnet: a small SD3 (flow matching) instead of Stable "
                        "Diffusion.")
    p.add_argument("--flux", action="store_true",
                   help="With --text_to_image or --controlnet: a small Flux (flow matching, packed latents).")
    p.add_argument("--dataset", default=None, help="Image-folder data set (the DiT measurements).")
    p.add_argument("--resolution", type=int, default=16, help="Training resolution.")
    p.add_argument("--batch_size", type=int, default=32, help="Training batch.")
    p.add_argument("--steps", type=int, default=60, help="Timed steps per run (after WARMUP + 1 untimed).")
    p.add_argument("--repeats", type=int, default=5, help="Interleaved pairs of runs per ratio.")
    p.add_argument("--bank_size", type=int, default=128, help="Samples for the generation benchmark.")
    p.add_argument("--bank_steps", type=int, default=50, help="DDIM steps for the generation benchmark.")
    p.add_argument("--num_workers", type=int, default=0, help="--dataloader_num_workers of the training runs.")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="Of the training runs.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (on a loaded 2-core machine two were 10x slower than one).")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="speed-")
    if a.text_to_image:
        return text_to_image(a, tmp)
    if a.controlnet:
        return controlnet(a, tmp)
    if a.dataset is None:
        p.error("--dataset is needed for the DiT measurements")
    if a.small:
        a.pipeline = f"{tmp}/small"
        build_pipeline(resolution=16, vae_channels=(16, 32), hidden=(2, 32), layers=4).save_pretrained(a.pipeline)
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

    def run(kind, r):
        flags = {"standard": ["--method", "standard", "--cache_latents"],
                 "diff_tuning": ["--method", "diff_tuning", "--cache_latents"],
                 "encode": ["--method", "standard"]}[kind]
        return timed_run([*base, *flags, "--output_dir", f"{tmp}/{kind}-{r}"], a.steps)

    times = {"standard": [], "diff_tuning": [], "encode": []}
    peaks = {}
    for r in range(a.repeats):  # interleaved, the order alternating, so drifts hit both kinds alike
        for kind in (["standard", "diff_tuning"] if r % 2 == 0 else ["diff_tuning", "standard"]) + ["encode"]:
            t, peaks[kind] = run(kind, r)
            times[kind].append(t)
    dt_ratio = [d / s for d, s in zip(times["diff_tuning"], times["standard"])]
    enc_ratio = [e / s for e, s in zip(times["encode"], times["standard"])]

    pipe = DiTPipeline.from_pretrained(a.pipeline)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    # Under the runs' mixed precision, as the training script generates its bank.
    dtype = precision_dtype(a.mixed_precision) if a.mixed_precision != "no" else None
    stock = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae,
                        scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    sampler = DiTBankSampler(pipe, num_inference_steps=a.bank_steps)

    def sample_stock(encode):
        for i in range(0, a.bank_size, 32):
            n = min(32, a.bank_size - i)
            images = stock(class_labels=[sampler.pool[j % len(sampler.pool)] for j in range(n)], guidance_scale=1.5,
                           num_inference_steps=a.bank_steps, output_type="np",
                           generator=[torch.Generator(device).manual_seed(i + j) for j in range(n)]).images
            if encode:  # what a bank must add: the latent moments of each sample and its mirror image
                encode_moments(pipe.vae, torch.from_numpy(images).permute(0, 3, 1, 2).to(device) * 2 - 1)

    bank = {"ours": [], "stock": [], "floor": []}
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None), torch.no_grad():
        for r in range(a.repeats):
            for kind in ("stock", "ours", "floor") if r % 2 == 0 else ("floor", "ours", "stock"):
                start = time.perf_counter()
                if kind == "ours":
                    generate_shards(sampler, f"{tmp}/gen-{r}", a.bank_size, batch_size=32, show_progress=False)
                else:
                    sample_stock(encode=kind == "floor")
                bank[kind].append(time.perf_counter() - start)
    ours_stock = [o / s for o, s in zip(bank["ours"], bank["stock"])]
    ours_floor = [o / f for o, f in zip(bank["ours"], bank["floor"])]
    floor_stock = [f / s for f, s in zip(bank["floor"], bank["stock"])]

    print(f"\ndevice: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, batch {a.batch_size}, "
          f"resolution {a.resolution}, {a.steps} timed steps per run, data-loader workers {a.num_workers}, "
          f"mixed precision {a.mixed_precision}")
    print(f"{a.repeats} interleaved repeats; median (range)\n")
    print("| measurement | value |\n|---|---|")
    print(f"| standard step, cached latents | {fmt([1000 * t for t in times['standard']], 1)} ms |")
    print(f"| Diff-Tuning step, cached latents | {fmt([1000 * t for t in times['diff_tuning']], 1)} ms |")
    print(f"| **Diff-Tuning / standard** (target <= 1.03) | **{fmt(dt_ratio)}** |")
    print(f"| standard step, VAE every step | {fmt([1000 * t for t in times['encode']], 1)} ms |")
    print(f"| **VAE every step / cached latents** | **{fmt(enc_ratio)}** |")
    print(f"| memory bank, {a.bank_size} samples x {a.bank_steps} DDIM steps: `generate_shards` | "
          f"{fmt(bank['ours'], 2)} s |")
    print(f"| same samples, stock DiTPipeline / + VAE encoding of sample and mirror (the floor) | "
          f"{fmt(bank['stock'], 2)} / {fmt(bank['floor'], 2)} s |")
    print(f"| bank generation / stock pipeline | {fmt(ours_stock)} |")
    print(f"| floor / stock pipeline (the encoding a bank needs) | {fmt(floor_stock)} |")
    print(f"| **bank generation / floor** (target <= 1.03) | **{fmt(ours_floor)}** |")
    if peaks.get("standard") is not None:
        print(f"| peak CUDA memory, standard / Diff-Tuning (cached latents) | {peaks['standard'] / 2**30:.2f} / "
              f"{peaks['diff_tuning'] / 2**30:.2f} GiB |")
        print(f"| **Diff-Tuning / standard peak memory** | **{peaks['diff_tuning'] / peaks['standard']:.3f}** |")


if __name__ == "__main__":
    main()
