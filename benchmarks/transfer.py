"""Small-scale transfer benchmark on CPU, in the spirit of Diff-Tuning's Table 1, Figure 6a and Figure 1.

    python -m benchmarks.transfer [--work_dir benchmarks_out/transfer] [--steps 300] [--seeds 0 1 2]

1. Source: the small class-conditional DiT pre-trained on MNIST-5k (`fixtures.small_dit`, cached), and one
   memory bank of it (`utils.memory_bank`, 320 samples), shared by every Diff-Tuning run.
2. Targets (offline, 16 px): `digits` (sklearn's 1,797 digits), `digits_fewshot` (10 per class of them; scored
   against all 1,797), `digits_inverted` (the same digits, white background: a domain shift).
3. Methods, same steps, batch (32) and learning rate for all: standard fine-tuning, Diff-Tuning, bias-only
   (BitFit), DiffFit, LoRA (merged), Diff-Tuning + DiffFit; every seed.
4. FID of 500 samples per run (DDIM 50 steps, CFG 1.5, balanced classes) against the target images. Features:
   the penultimate layer of a small CNN classifier trained here on MNIST-5k (TorchScript, `mnist_features.pt`).
   The Inception extractors cost about 0.5 s per image on 2 CPU cores (the table needs ~30K images), and
   Inception features of 16 px digits mean little; so these FIDs are comparable with each other only.
5. Convergence (FID against steps, target `digits`, seed 0) for standard fine-tuning and Diff-Tuning from their
   checkpoints, and the chain of forgetting (`evaluate_fid.py --handoff_model <source>`) for both.

Writes `<work_dir>/results.json`, `benchmarks/transfer_table.md`, `benchmarks/transfer_convergence.png`,
`benchmarks/chain_of_forgetting.png`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import evaluate_fid
import train_diff_tuning_dit
from fixtures.in_process import run_script
from fixtures.offline_data import mnist_5k, sklearn_digits, write_image_folder
from utils.memory_bank import is_memory_bank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "standard": ["--method", "standard"],
    "diff_tuning": ["--method", "diff_tuning"],
    "bitfit": ["--method", "standard", "--tuning", "bitfit"],
    "difffit": ["--method", "standard", "--tuning", "difffit"],  # the first half of the blocks, as 14 of DiT-XL's 28
    "lora": ["--method", "standard", "--tuning", "lora", "--merge_lora"],
    "diff_tuning+difffit": ["--method", "diff_tuning", "--tuning", "difffit"],
}


def write_targets(root):
    images, labels, names = sklearn_digits()
    targets = {"digits": images, "digits_inverted": 255 - images}
    for name, imgs in targets.items():
        if not os.path.isdir(os.path.join(root, name)):
            write_image_folder(imgs, labels, names, os.path.join(root, name + ".tmp"))
            os.replace(os.path.join(root, name + ".tmp"), os.path.join(root, name))
    few = os.path.join(root, "digits_fewshot")
    if not os.path.isdir(few):
        keep = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)])
        write_image_folder(images[keep], labels[keep], names, few + ".tmp")
        os.replace(few + ".tmp", few)
    return {"digits": ("digits", "digits"), "digits_fewshot": ("digits_fewshot", "digits"),
            "digits_inverted": ("digits_inverted", "digits_inverted")}  # name: (train folder, reference folder)


class MnistFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):  # float NCHW RGB in [0, 1], any size -> 128 features
        return self.body(torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))


def feature_extractor(path):
    """Train the FID feature network on MNIST-5k (both polarities, so inverted digits are in its domain)."""
    if os.path.exists(path):
        return path
    torch.manual_seed(0)
    images, labels, _ = mnist_5k()
    x = torch.nn.functional.interpolate(torch.from_numpy(images).float()[:, None] / 255, size=(16, 16),
                                        mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x, y = torch.cat([x, 1 - x]), torch.from_numpy(np.concatenate([labels, labels]))
    net = MnistFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(1500):
        idx = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.cross_entropy(net.head(net(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (net.head(net(x)).argmax(1) == y).float().mean().item()
    print(f"feature network: training accuracy {accuracy:.3f}")
    torch.jit.script(net.eval()).save(path)
    return path


def fine_tune(source, bank, data, out, method, steps, seed, checkpointing_steps):
    if os.path.exists(os.path.join(out, "README.md")):
        return
    run_script(train_diff_tuning_dit, [
        "--pretrained_model_name_or_path", source, "--dataset", data, "--output_dir", out, *METHODS[method],
        "--memory_bank", bank, "--resolution", "16", "--no-random_flip", "--cache_latents",
        "--train_batch_size", "32", "--learning_rate", "5e-4", "--max_train_steps", str(steps),
        "--checkpointing_steps", str(checkpointing_steps), "--validation_steps", "0", "--report_to", "none",
        "--num_validation_images", "10", "--validation_inference_steps", "25", "--seed", str(seed)])


def fid(model, reference, extractor, samples, out_file, *extra):
    report = evaluate_fid.main(evaluate_fid.parse_args([
        "--model", model, "--dataset", reference, "--feature_extractor", extractor, "--num_samples", str(samples),
        "--batch_size", "100", "--reference_cache_dir", os.path.join(os.path.dirname(out_file), "..", "fid_cache"),
        "--output_file", out_file, *extra]))
    return [r["fid"] for r in report["results"]]


def checkpoint_pipeline(final, checkpoint, out):
    """The final pipeline folder with the transformer weights of a training checkpoint."""
    if not os.path.exists(out):
        shutil.copytree(final, out, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "memory_bank"))
        state = load_file(os.path.join(checkpoint, "model.safetensors"))
        target = os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors")
        keys = load_file(target).keys()
        save_file({k: state[k].contiguous() for k in keys}, target)
    return out


def plot(series, xlabel, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (MNIST-CNN features)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="benchmarks_out/transfer", help="Models, data and reports (not committed).")
    p.add_argument("--steps", type=int, default=300, help="Fine-tuning steps of every run.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of every method and target.")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="Methods.")
    p.add_argument("--fid_samples", type=int, default=500, help="Samples per FID.")
    p.add_argument("--convergence_points", type=int, default=5, help="Checkpoints on the FID-vs-steps curve.")
    a = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    w = os.path.abspath(a.work_dir)
    os.makedirs(os.path.join(w, "reports"), exist_ok=True)
    source = os.path.join(w, "source")
    subprocess.run([sys.executable, "-m", "fixtures.small_dit", "--output_dir", source], cwd=ROOT, check=True)
    bank = os.path.join(w, "memory_bank")
    if not is_memory_bank(bank):
        subprocess.run([sys.executable, "-m", "utils.memory_bank", "--pretrained_model_name_or_path", source,
                        "--output_dir", bank, "--size", "320", "--batch_size", "64"], cwd=ROOT, check=True)
    targets = write_targets(os.path.join(w, "data"))
    extractor = feature_extractor(os.path.join(w, "mnist_features.pt"))
    results_path = os.path.join(w, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    every = max(1, a.steps // a.convergence_points)
    for target, (train_folder, reference_folder) in targets.items():
        data, reference = os.path.join(w, "data", train_folder), os.path.join(w, "data", reference_folder)
        for method in a.methods:
            for seed in a.seeds:
                key = f"{target}/{method}/{seed}"
                if key in results:
                    continue
                out = os.path.join(w, "runs", target, method, str(seed))
                t0 = time.time()
                fine_tune(source, bank, data, out, method, a.steps, seed, every)
                results[key] = fid(out, reference, extractor, a.fid_samples,
                                   os.path.join(w, "reports", key.replace("/", "_") + ".json"))[0]
                print(f"{key}: FID {results[key]:.2f} ({time.time() - t0:.0f} s)", flush=True)
                json.dump(results, open(results_path, "w"), indent=2)
    source_fid = {t: fid(source, os.path.join(w, "data", ref), extractor, a.fid_samples,
                         os.path.join(w, "reports", f"source_{t}.json"))[0] for t, (_, ref) in targets.items()}

    # Convergence and the chain of forgetting: target digits, seed 0, standard vs Diff-Tuning.
    curves, chains = {}, {}
    reference = os.path.join(w, "data", "digits")
    for method in ("standard", "diff_tuning"):
        final = os.path.join(w, "runs", "digits", method, "0")
        xs, ys = [], []
        for step in range(every, a.steps + 1, every):
            ckpt = os.path.join(final, f"checkpoint-{step}")
            if not os.path.isdir(ckpt):
                continue
            model = checkpoint_pipeline(final, ckpt, os.path.join(w, "convergence", method, str(step)))
            xs.append(step)
            ys.append(fid(model, reference, extractor, a.fid_samples,
                          os.path.join(w, "reports", f"convergence_{method}_{step}.json"))[0])
        curves[method] = (xs, ys)
        fractions = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        chains[method] = ([100 * k for k in fractions],
                          fid(final, reference, extractor, a.fid_samples,
                              os.path.join(w, "reports", f"chain_{method}.json"), "--handoff_model", source,
                              "--handoff_fractions", *map(str, fractions)))
    plot(curves, "fine-tuning step", os.path.join(ROOT, "benchmarks", "transfer_convergence.png"),
         "target digits, seed 0: FID during fine-tuning")
    plot(chains, "last k% of the 50 DDIM steps by the pre-trained model",
         os.path.join(ROOT, "benchmarks", "chain_of_forgetting.png"), "chain of forgetting (target digits, seed 0)")

    # The table: mean +- std over seeds, and Diff-Tuning's relative improvement over standard fine-tuning.
    lines = ["| method | " + " | ".join(targets) + " | mean |", "|---" * (len(targets) + 2) + "|"]
    means = {}
    for method in a.methods:
        cells, per_target = [], []
        for target in targets:
            vals = np.array([results[f"{target}/{method}/{s}"] for s in a.seeds])
            per_target.append(vals.mean())
            cells.append(f"{vals.mean():.2f} +- {vals.std(ddof=1) if len(vals) > 1 else 0:.2f}")
        means[method] = per_target
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean(per_target):.2f} |")
    lines.append("| pre-trained source (no fine-tuning) | " + " | ".join(f"{source_fid[t]:.2f}" for t in targets)
                 + f" | {np.mean(list(source_fid.values())):.2f} |")
    if "standard" in means and "diff_tuning" in means:
        rel = [(s - d) / s for s, d in zip(means["standard"], means["diff_tuning"])]
        lines.append("")
        lines.append("Relative FID improvement of Diff-Tuning over standard fine-tuning: "
                     + ", ".join(f"{t} {100 * r:+.1f}%" for t, r in zip(targets, rel))
                     + f"; mean {100 * np.mean(rel):+.1f}% (the paper: 26% on average).")
    lines.append("")
    lines.append("Chain of forgetting, FID at k = " + ", ".join(f"{k:g}%" for k in chains["standard"][0]) + ": "
                 + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in ys) for m, (_, ys) in chains.items()))
    lines.append("Convergence, FID at steps " + ", ".join(map(str, curves["standard"][0])) + ": "
                 + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in ys) for m, (_, ys) in curves.items()))
    lines.append(f"\nWall time of this invocation (runs already in results.json are not redone): "
                 f"{(time.time() - start) / 60:.1f} min.")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(ROOT, "benchmarks", "transfer_table.md"), "w") as f:
        f.write(f"Command: `python -m benchmarks.transfer --steps {a.steps} --seeds {' '.join(map(str, a.seeds))}`"
                f", {a.fid_samples} samples per FID.\n\n{table}\n")


if __name__ == "__main__":
    main()
