"""DeMe speed and memory benchmarks, as ratios measured in one run (README: benchmarks/RESULTS.md).

    python -m benchmarks.deme [--steps 10] [--batch_size 8] [--work_dir /tmp/deme_bench]

1. Step time: a DeMe step (trained copy with channel projections + the frozen model's forward for the consistency
   loss) vs a standard fine-tuning step, same UNet (the DDPM CIFAR-10 architecture, 35.7M parameters, random
   weights) and batch, interleaved so both see the same machine state.
2. Merge: wall time and peak memory of `merge_timestep_models.py` (its main(), after the imports) for N = 2, 4, 8
   copies, against the size of one model, the peak of loading one model, and the time of reading the N + 1 input
   files once, tensor by tensor (the floor for any merge). Goals (hardening issue): peak at most half a model at
   N = 8; wall time within 1.5x of reading the inputs once.
"""

import argparse
import copy
import os
import shutil
import subprocess
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from utils.methods.channel_projection import add_projections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"


def cifar10_unet() -> UNet2DModel:
    """The architecture of google/ddpm-cifar10-32 (its config), with random weights."""
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                             "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, dropout=0.1, norm_num_groups=32)


def step_times(steps: int, batch_size: int):
    torch.manual_seed(0)
    base = cifar10_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    standard = copy.deepcopy(base).train()
    deme = copy.deepcopy(base).train()
    add_projections(deme, "foldable")
    frozen = base.requires_grad_(False).eval()
    optims = {"standard": torch.optim.AdamW(standard.parameters(), lr=1e-4),
              "deme": torch.optim.AdamW(deme.parameters(), lr=1e-4)}
    x0 = torch.randn(batch_size, 3, 32, 32)

    def step(kind):
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch_size,))
        noisy = scheduler.add_noise(x0, noise, t)
        model = standard if kind == "standard" else deme
        pred = model(noisy, t).sample
        loss = (pred - noise).pow(2).mean()
        if kind == "deme":
            with torch.no_grad():
                reference = frozen(noisy, t).sample
            loss = loss + (pred - reference).pow(2).mean()
        loss.backward()
        optims[kind].step()
        optims[kind].zero_grad()

    times = {"standard": [], "deme": []}
    for i in range(steps + 1):
        for kind in ("standard", "deme") if i % 2 else ("deme", "standard"):
            start = time.perf_counter()
            step(kind)
            if i:  # the first round warms up
                times[kind].append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in standard.parameters())
    extra = sum(p.numel() for p in deme.parameters()) - n_params
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}, n_params, extra


def peak_memory_mb(code: str) -> tuple[float, float]:
    """(peak RSS of `code` above the RSS after the imports, in MB; wall seconds of `code`), in a fresh
    `python -c` from the repo root. The kernel's high-water mark is reset after the imports (clear_refs 5), so
    the peak is the code's own, not the imports' or the parent's (ru_maxrss survives fork and exec)."""
    wrapper = f"""import re, time
import merge_timestep_models
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
start = time.perf_counter()
{code}
print("PEAK", status("VmHWM") - base, time.perf_counter() - start)
"""
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    _, peak, wall = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK")][-1].split()
    return float(peak), float(wall)


def merge_memory(work_dir: str, counts=(2, 4, 8)):
    torch.manual_seed(0)
    base = cifar10_unet()
    base.save_pretrained(os.path.join(work_dir, "base"))
    size_mb = os.path.getsize(os.path.join(work_dir, "base", WEIGHTS)) / 2**20
    for i in range(max(counts)):
        folder = os.path.join(work_dir, f"copy_{i}")
        if not os.path.exists(folder):
            model = copy.deepcopy(base)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            model.save_pretrained(folder)
    one_model, _ = peak_memory_mb(
        "from safetensors.torch import load_file\n"  # clone: load_file maps the file lazily
        f"sd = {{k: v.clone() for k, v in load_file({os.path.join(work_dir, 'base', WEIGHTS)!r}).items()}}")
    rows = []
    for n in counts:
        models = [os.path.join(work_dir, f"copy_{i}") for i in range(n)]
        argv = ["--base_model", os.path.join(work_dir, "base"), "--models", *models,
                "--output_dir", os.path.join(work_dir, f"merged_{n}")]
        shutil.rmtree(argv[-1], ignore_errors=True)
        peak, wall = peak_memory_mb(f"merge_timestep_models.main(merge_timestep_models.parse_args({argv!r}))")
        _, read = peak_memory_mb(
            "from utils.methods.merging import SafetensorsWeights\n"
            f"for folder in {[os.path.join(work_dir, 'base'), *models]!r}:\n"
            "    weights = SafetensorsWeights(folder)\n"
            "    total = sum(float(weights.get(k).float().sum()) for k in weights.keys())")
        rows.append((n, wall, peak, peak / size_mb, read))
    return size_mb, one_model, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="Timed steps of each kind (median reported).")
    p.add_argument("--batch_size", type=int, default=8, help="Batch of the step benchmark.")
    p.add_argument("--skip_steps", action="store_true", help="Only the merge benchmark.")
    p.add_argument("--work_dir", default="/tmp/deme_bench", help="Where the model copies for the merge go.")
    a = p.parse_args()
    os.makedirs(a.work_dir, exist_ok=True)
    if not a.skip_steps:
        times, n_params, extra = step_times(a.steps, a.batch_size)
        print(f"step, UNet {n_params / 1e6:.1f}M params (+{extra / 1e3:.0f}K projection params = "
              f"{100 * extra / n_params:.2f}%), batch {a.batch_size} at 32x32, median of {a.steps}:")
        print(f"  standard {times['standard'] * 1e3:.0f} ms, DeMe {times['deme'] * 1e3:.0f} ms, "
              f"ratio DeMe/standard {times['deme'] / times['standard']:.3f}")
    size_mb, one_model, rows = merge_memory(a.work_dir)
    print(f"merge: one model {size_mb:.0f} MB of safetensors; loading it into memory peaks at {one_model:.0f} MB "
          "above the imports")
    print("| N | merge wall s | reading the inputs once, s | merge / reading | peak RSS above imports, MB | "
          "/ one model's size |")
    print("|---|---|---|---|---|---|")
    for n, wall, peak, copies, read in rows:
        print(f"| {n} | {wall:.1f} | {read:.1f} | {wall / read:.2f} | {peak:.0f} | {copies:.2f} |")


if __name__ == "__main__":
    main()
