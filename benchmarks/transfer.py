"""Does Diff-Tuning help where its premise holds? Diff-Tuning's Table 1 / Figure 1 claim at toy scale on 2 CPU
cores, with the premise checked first (about 3 hours from scratch on one
thread, or 2 with `--targets A C` and `--targets B` in two processes; resumable: finished stages are kept).

    python -m benchmarks.transfer [--work_dir benchmarks_out/transfer2] [--quick]

Fixed before any run (this docstring was written first; results go to benchmarks/RESULTS.md whichever way they go):

Source. The small class-conditional DiT of the demo (`fixtures.small_dit`: hidden 64, 4 blocks, its own small VAE,
16 px) pre-trained on the MNIST-5k digits 0-4 only (`--classes 0 1 2 3 4`, 2,000 steps), cached. One memory bank of
it: 2,000 samples (the paper's smallest is 5K; 2K is what this source can be asked for on 2 cores), CFG 1.5,
50 DDIM steps, shared by every Diff-Tuning run.

Targets (16 px, their classes on the label rows 0..C-1, which meant other classes for the source, as ImageNet rows
do for the paper's targets):
  A  new classes, few-shot: MNIST digits 5-9, 10 per class (split seed 0); FID against the other images of 5-9.
  B  the same with 100 per class.
  C  negative control: sklearn digits 0-4 (the source's own classes in another rendering: 8x8 upsampled), 100 per
     class; FID against the other sklearn digits 0-4. The premise (a good small-t denoiser, a new domain) is
     reversed here; a method that helps on C helps for another reason.
Arms (train_diff_tuning_dit.py; batch 32, lr 5e-4 constant, EMA 0.999 for all, sampled from the EMA):
  standard, paper_mix (Diff-Tuning, 50% bank rows, retention weight 1), official_mix (20% bank rows, weight 0.1, as
  thuml/Diffusion-Tuning's DiT code), difffit, lora (rank 4, merged). 3,000 steps; the model after 250, 500, 1,000,
  2,000 and 3,000 steps (a resumed chain of runs: each stage's final EMA pipeline is kept).
Seeds 0, 1, 2, paired: seed s sets the training randomness of every arm; data splits, the bank and the sampling seeds
are shared by all arms.

Measures, per target, arm and seed: FID of 1,000 samples (DDIM 50, CFG 1.5, balanced classes; MNIST-CNN features,
comparable within this table only) at every stage on A, at the last stage on B and C; a memorisation index (share of
300 samples whose nearest neighbour, in the same features, is a training image rather than one of as many held-out
images of the same classes: 0.5 means no memorisation); the denoising error (epsilon MSE, null class, fixed noise)
on 128 held-out target images per t bucket [0, 100), [100, 300), [300, 600), [600, 1000).

Premise checks, reported per target before any arm is read: with standard fine-tuning (seed 0, last stage)
  (a) the chain of forgetting: handing the last 2 / 5 / 10 / 20% of the DDIM steps to the source, unconditionally
      (its null class), must not cost more than 5% FID at 10% (the paper's Fig. 1: neutral for small k);
  (b) the source must denoise held-out target images at t < 100 at least as well as the fine-tuned model (error at
      most 1.05 x the fine-tuned model's).
A target failing (a) or (b) is reported as a negative control.

Reading rule, for each Diff-Tuning mix: "reproduced" if on A (premise holding) its last-stage FID is lower than
standard's in every seed, at least 10% lower on average, with the mean paired difference above 2 standard errors,
AND on C it gains less than 10% (no gain where the premise is reversed); "contradicted" if on A it is worse than
standard on average by more than 2 standard errors; otherwise "not reproduced (inconclusive at this scale)".
`--quick` (seed 0, 600 steps in stages 300/600, 300 samples per FID, a 500-sample bank, a 800-step source) only
checks that everything runs; its numbers are not read. `--premise_only` runs the full-size premise checks alone
(standard fine-tuning, seed 0, every target; about 35 minutes), and the full run reuses what it made.
"""

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

import train_diff_tuning_dit
from benchmarks.small_fid import cached_fid, train_and_save
from fixtures.in_process import run_script
from fixtures.offline_data import mnist_5k, sklearn_digits, write_image_folder
from utils.methods.memory_bank import is_memory_bank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
    "standard": ["--method", "standard"],
    "paper_mix": ["--method", "diff_tuning", "--retention_ratio", "0.5", "--retention_weight", "1.0"],
    "official_mix": ["--method", "diff_tuning", "--retention_ratio", "0.2", "--retention_weight", "0.1"],
    "difffit": ["--method", "standard", "--tuning", "difffit"],
    "lora": ["--method", "standard", "--tuning", "lora", "--merge_lora"],
}
BUCKETS = [(0, 100), (100, 300), (300, 600), (600, 1000)]
HANDOFF = [0.0, 0.02, 0.05, 0.1, 0.2]
PIPELINE_FILES = shutil.ignore_patterns("checkpoint-*", "logs", "memory_bank", "*.tmp*", ".created_by.json")


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
    """The FID feature network, trained on all of MNIST-5k (both polarities); cached as TorchScript."""
    if os.path.exists(path):
        return path
    images, labels, _ = mnist_5k()
    x = torch.nn.functional.interpolate(torch.from_numpy(images).float()[:, None] / 255, size=(16, 16),
                                        mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x, y = torch.cat([x, 1 - x]), torch.from_numpy(np.concatenate([labels, labels]))
    torch.manual_seed(0)  # the network's initial weights
    return train_and_save(MnistFeatures(), x, y, path)


def write_targets(root, quick):
    """{target: (train folder, reference folder, held-out folder)}: class folders of PNGs (split seed 0)."""
    rng = np.random.default_rng(0)
    mnist, mnist_y, names = mnist_5k()
    digits, digits_y, _ = sklearn_digits()
    specs = {"A": (mnist, mnist_y, [5, 6, 7, 8, 9], 10), "B": (mnist, mnist_y, [5, 6, 7, 8, 9], 100),
             "C": (digits, digits_y, [0, 1, 2, 3, 4], 100)}
    if quick:
        specs = {k: specs[k] for k in ("A", "C")}
    folders = {}
    for target, (images, labels, classes, per_class) in specs.items():
        train, rest = [], []
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            train.append(rows[:per_class])
            rest.append(rows[per_class:])
        train, rest = np.concatenate(train), np.concatenate(rest)
        held = rng.permutation(rest)[:max(len(train), 128)]  # memorisation and denoising-error images
        paths = []
        for part, rows in (("train", train), ("reference", rest), ("held_out", held)):
            path = os.path.join(root, target, part)
            if not os.path.isdir(path):
                write_image_folder(images[rows], labels[rows], names, path + ".tmp")
                os.replace(path + ".tmp", path)
            paths.append(path)
        folders[target] = tuple(paths)
    return folders


def train_stages(source, bank, data, run_dir, arm, seed, stages):
    """Train to each stage in turn (a resumed chain: the same as one run) and keep each stage's EMA pipeline."""
    out = os.path.join(run_dir, "train")
    for step in stages:
        stage = os.path.join(run_dir, f"step{step}")
        if os.path.exists(os.path.join(stage, "model_index.json")):
            continue
        run_script(train_diff_tuning_dit, [
            "--pretrained_model_name_or_path", source, "--dataset", data, "--output_dir", out, *ARMS[arm],
            "--memory_bank", bank, "--resolution", "16", "--no-random_flip", "--cache_latents",
            "--train_batch_size", "32", "--learning_rate", "5e-4", "--use_ema", "--ema_decay", "0.999",
            "--max_train_steps", str(step), "--checkpointing_steps", str(np.gcd.reduce(stages)),
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest", "--validation_steps", "0",
            "--num_validation_images", "10", "--validation_inference_steps", "10", "--report_to", "none",
            "--skip_image_check", "--seed", str(seed)])
        shutil.copytree(out, stage + ".tmp", ignore=PIPELINE_FILES, dirs_exist_ok=True)
        os.replace(stage + ".tmp", stage)


def record(path, target, arm, seed, entry):
    """Write one run's entry into the shared results file (locked read-modify-write, atomic replace): several
    `--targets` processes may share a work_dir."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.load(open(path)) if os.path.exists(path) else {}
        results.setdefault(target, {}).setdefault(arm, {})[str(seed)] = entry
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
    return results


def images_of(folder):
    """All images of a class-folder set as float NCHW in [0, 1]."""
    from utils.infra.data import load_image_dataset

    ds = load_image_dataset(folder)
    return torch.stack([torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
                        for img in ds["image"]])


@torch.no_grad()
def memorisation(pipe, net, train, held, samples):
    """Share of samples whose nearest neighbour (feature space of `net`) is a training image rather than one of as
    many held-out images (`train`, `held`: float NCHW in [0, 1])."""
    from utils.families.dit import DiT
    from utils.metrics.sampling import generate

    parts = {"vae": pipe.vae, "scheduler": pipe.scheduler}
    generated = torch.cat(list(generate(DiT.evaluation_pipeline(pipe.transformer, parts), samples, 100, 50, 123,
                                        "cpu", sorted(set(pipe.labels.values())), 1.5, desc="memorisation samples")))
    feats = [net(x) for x in (generated, train, held[: len(train)])]
    d_train = torch.cdist(feats[0], feats[1]).min(1).values
    d_held = torch.cdist(feats[0], feats[2]).min(1).values
    return float((d_train < d_held).float().mean())


@torch.no_grad()
def denoising_errors(pipe, held, count=128, seed=0):
    """Epsilon MSE of the pipeline's DiT (null class) on held-out images (float NCHW in [0, 1]), per t bucket, with
    the same t and noise for every model."""
    from diffusers import DDPMScheduler

    transformer, vae = pipe.transformer.eval(), pipe.vae.eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = vae.encode(held[:count] * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    errors = []
    for lo, hi in BUCKETS:
        t = torch.randint(lo, hi, (len(latents),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        null = torch.full((len(latents),), transformer.config.num_embeds_ada_norm)
        pred = transformer(noisy, timestep=t, class_labels=null).sample[:, : latents.shape[1]]
        errors.append(float(((pred - noise) ** 2).mean()))
    return errors


def paired(values_a, values_b):
    """Mean and standard error of the paired differences a - b."""
    d = np.asarray(values_a) - np.asarray(values_b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def reading(results, premise, seeds, last):
    out = {}
    for mix in ("paper_mix", "official_mix"):
        if not premise.get("A", {}).get("holds"):
            out[mix] = "negative control: the premise fails on A, nothing is read"
            continue
        std = [results["A"]["standard"][str(s)]["fid"][str(last)] for s in seeds]
        dt = [results["A"][mix][str(s)]["fid"][str(last)] for s in seeds]
        mean_diff, se = paired(dt, std)
        rel = (np.mean(std) - np.mean(dt)) / np.mean(std)
        c_gain = None
        if all(str(s) in results.get("C", {}).get(mix, {}) and str(s) in results["C"].get("standard", {})
               for s in seeds):
            c_std = np.mean([results["C"]["standard"][str(s)]["fid"][str(last)] for s in seeds])
            c_dt = np.mean([results["C"][mix][str(s)]["fid"][str(last)] for s in seeds])
            c_gain = (c_std - c_dt) / c_std
        if all(d < s for d, s in zip(dt, std)) and rel >= 0.10 and -mean_diff > 2 * se and (c_gain is None or
                                                                                           c_gain < 0.10):
            out[mix] = "reproduced"
        elif mean_diff > 2 * se:
            out[mix] = "contradicted"
        else:
            out[mix] = "not reproduced (inconclusive at this scale)"
        out[mix] += f" (A: {100 * rel:+.1f}% FID vs standard, paired diff {mean_diff:+.2f} +- {se:.2f} SE" + (
            f"; C: {100 * c_gain:+.1f}%)" if c_gain is not None else ")")
    return out


def plot(results, premise, stages, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for arm, runs in results["A"].items():
        means = [np.mean([runs[str(s)]["fid"][str(st)] for s in seeds]) for st in stages]
        ax.plot(stages, means, marker="o", label=arm)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(stages, [str(s) for s in stages])
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("FID (MNIST-CNN features)")
    ax.set_title("target A (digits 5-9, 10 per class): FID during fine-tuning", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    for target, p in premise.items():
        ax.plot([100 * k for k in HANDOFF], p["chain"], marker="o", label=f"{target}: standard, seed {seeds[0]}")
    ax.set_xlabel("last k% of the DDIM steps by the source (null class)")
    ax.set_ylabel("FID")
    ax.set_title("premise (a): chain of forgetting", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[2]
    labels = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    for arm, runs in results["A"].items():
        ax.plot(labels, np.mean([runs[str(s)]["denoising_error"] for s in seeds], axis=0), marker="o", label=arm)
    ax.plot(labels, premise["A"]["source_error"], marker="s", color="k", label="source")
    ax.set_yscale("log")
    ax.set_xlabel("t bucket")
    ax.set_ylabel("epsilon MSE on held-out A images (null class)")
    ax.set_title("premise (b) and retention: denoising error by t", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="benchmarks_out/transfer2", help="Models, data and reports (not committed).")
    p.add_argument("--quick", action="store_true", help="A smoke run: nothing is read from it.")
    p.add_argument("--premise_only", action="store_true",
                   help="Only what the premise checks need (standard fine-tuning, first seed, every target), to see "
                        "whether the full run can say anything before spending hours on it.")
    p.add_argument("--targets", nargs="+", choices=["A", "B", "C"], default=["A", "B", "C"],
                   help="Targets to run (the data of all three is written either way, so splits do not depend on "
                        "this); processes with different targets can share a work_dir. The reading and the plot "
                        "need A.")
    a = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(1)  # 2 cores: two intra-op threads under load were 10x slower than one
    if a.quick:
        seeds, stages, samples, bank_size, source_steps, mem_samples = [0], [300, 600], 300, 500, 800, 100
    else:
        seeds, stages, samples, bank_size, source_steps, mem_samples = [0, 1, 2], [250, 500, 1000, 2000, 3000], 1000, \
            2000, 2000, 300
    w = os.path.abspath(a.work_dir + ("_quick" if a.quick else ""))
    os.makedirs(os.path.join(w, "reports"), exist_ok=True)
    started = time.time()
    source = os.path.join(w, "source")
    subprocess.run([sys.executable, "-m", "fixtures.small_dit", "--output_dir", source, "--classes", "0", "1", "2",
                    "3", "4", "--dit_steps", str(source_steps)], cwd=ROOT, check=True)
    bank = os.path.join(w, "memory_bank")
    if not is_memory_bank(bank):
        subprocess.run([sys.executable, "generate_memory_bank.py", "--pretrained_model_name_or_path", source,
                        "--output_dir", bank, "--size", str(bank_size), "--batch_size", "100"], cwd=ROOT, check=True)
    targets = write_targets(os.path.join(w, "data"), a.quick)
    extractor = feature_extractor(os.path.join(w, "mnist_features.pt"))
    print(f"source, bank, data ready ({time.time() - started:.0f} s)", flush=True)
    results_path = os.path.join(w, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    last = stages[-1]

    from diffusers import DiTPipeline

    net = torch.jit.load(extractor)
    premise = {}
    # A, then the control C, then B: a run stopped early still has what the reading rule needs.
    for target, (train, reference, held) in sorted(targets.items(), key=lambda item: "ACB".index(item[0])):
        if target not in a.targets:
            continue
        train_images, held_images = images_of(train), images_of(held)  # decoded once per target
        for arm in ["standard"] if a.premise_only else ARMS:
            for seed in seeds[:1] if a.premise_only else seeds:
                entry = results.setdefault(target, {}).setdefault(arm, {}).setdefault(str(seed), {"fid": {}})
                run_dir = os.path.join(w, "runs", target, arm, str(seed))
                t0 = time.time()
                train_stages(source, bank, train, run_dir, arm, seed, stages)
                for step in stages if target == "A" else [last]:
                    if str(step) not in entry["fid"]:
                        report = os.path.join(w, "reports", f"{target}_{arm}_{seed}_{step}.json")
                        entry["fid"][str(step)] = cached_fid(os.path.join(run_dir, f"step{step}"), reference,
                                                             extractor, samples, report)[0]
                if "memorisation" not in entry or "denoising_error" not in entry:
                    final = DiTPipeline.from_pretrained(os.path.join(run_dir, f"step{last}"))
                    entry["memorisation"] = memorisation(final, net, train_images, held_images, mem_samples)
                    entry["denoising_error"] = denoising_errors(final, held_images)
                results = record(results_path, target, arm, seed, entry)
                print(f"{target} {arm} seed {seed}: FID {entry['fid']}, memorisation {entry['memorisation']:.2f}, "
                      f"error by t {[round(e, 4) for e in entry['denoising_error']]} ({time.time() - t0:.0f} s, "
                      f"{(time.time() - started) / 60:.0f} min in all)", flush=True)
        # Premise checks on the standard run of the first seed.
        final = os.path.join(w, "runs", target, "standard", str(seeds[0]), f"step{last}")
        chain = cached_fid(final, reference, extractor, samples, os.path.join(w, "reports", f"{target}_chain.json"),
                           "--handoff_model", source, "--handoff_condition", "null", "--handoff_fractions",
                           *map(str, HANDOFF))
        source_error = denoising_errors(DiTPipeline.from_pretrained(source), held_images)
        ft_error = results[target]["standard"][str(seeds[0])]["denoising_error"]
        a_ok = chain[HANDOFF.index(0.1)] <= 1.05 * chain[0]
        b_ok = source_error[0] <= 1.05 * ft_error[0]
        premise[target] = {"chain": chain, "source_error": source_error, "fine_tuned_error": ft_error,
                           "a_holds": a_ok, "b_holds": b_ok, "holds": a_ok and b_ok}
        print(f"premise on {target}: (a) chain {[round(c, 2) for c in chain]} -> {a_ok}; (b) source error at t<100 "
              f"{source_error[0]:.4f} vs fine-tuned {ft_error[0]:.4f} -> {b_ok}", flush=True)

    report = {"premise": premise, "seeds": seeds, "stages": stages, "samples_per_fid": samples,
              "minutes": (time.time() - started) / 60}
    if a.premise_only or "A" not in a.targets:
        print(json.dumps(report, indent=1))
        return
    results = json.load(open(results_path))  # with what other processes recorded
    report["reading"] = reading(results, premise, seeds, last)
    with open(os.path.join(w, "report.json"), "w") as f:
        json.dump({**report, "results": results}, f, indent=2)
    png = os.path.join(ROOT, "benchmarks", "transfer.png") if not a.quick else os.path.join(w, "transfer.png")
    plot(results, premise, stages, seeds, png)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
