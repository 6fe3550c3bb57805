"""Does DeMe improve a converged model? DeMe's Table 1 claim at toy scale on 2 CPU cores, version 2: a base trained
until plain training stops moving it, six paired seeds, FID from two sets of 2,000 samples (at most 2 hours from
scratch; resumable: finished stages, runs and FIDs are kept).

    python -m benchmarks.deme_table [--work_dir benchmarks_out/deme_table_v2] [--quick]

Fixed before any run of version 2 (this docstring was written first; results go to benchmarks/RESULTS.md whichever
way they go). Version 1 (2026-11-25, RESULTS.md) had an unconverged base (every fine-tuned model beat it; continued
training +10.8%, interval crossing 0) and a +-29% interval from 3 seeds at 1,000 samples; version 2 repairs both and
drops the side arms (Min-SNR, N = 1, foldable maps, searched weights).

Data. scikit-learn's 1,797 8x8 digits (they ship with the package), split once (seed 0): 1,297 to train on, 500
held out. Every FID is against the 500 held-out digits, in the features of a small CNN classifier trained on the
training split only (cached; comparable within this table only).

Base. A pixel-space DDPM `UNet2DModel` (8x8, channels 16/32, one attention level, 177K parameters, the DDPM CIFAR-10
noise schedule) from random weights, trained with plain denoising through `train_deme.py` (one range, p = 1, no
consistency, no projections), batch 64, EMA 0.999 (what is saved and sampled), in stages of 2,000 steps, each
starting from the previous stage's EMA weights with a cosine-decayed lr (to 0 at the stage's end; no warm-up):
stage 0 from 1e-3, every later stage from 2e-4 (the arms' lr). After each stage: FID (below). Pre-training stops
after the first two consecutive stages that each change the mean FID by less than 2% (relative, either sign), or
after 12 stages (24,000 steps, the budget fixed now); if the budget ends first, the base is reported as not
converged by the rule and the arms still run, read under that caveat.

Arms (training seeds 0..5, paired; equal total steps 1,000; lr 2e-4 cosine-decayed to 0, batch 64, EMA 0.999; all
through `train_deme.py` on the training split, as the paper fine-tunes on the pre-training data):
  continued   plain training for 1,000 steps: the control, and the baseline.
  deme        N = 4, p = 0.4 (the paper's CIFAR-10 value), consistency weight 1, official channel projections (the
              paper's placement), 250 steps per range (each range's lr cosine-decayed over its 250 steps); then
              merged with w_i = 1/4 (the paper's uniform merge) and, separately, the timestep-wise ensemble
              ("before merge": each range's model samples its own timesteps).
FID of every model: the mean over two sets of 2,000 samples (DDIM 50, sampling seeds 0 and 10,000, the same for
every model).

Premise check (the control): continued plain training must not improve on the base. Its gain over the base,
(FID_base - FID_continued) / FID_base per training seed, has a 95% t-interval over the 6 seeds; if the interval lies
above 0 and the mean gain is at least 2%, the base is not converged, the comparison is void, and the table says so.

Reading rule (`benchmarks.verdicts`), for the uniform merge (the main reading) and the ensemble (secondary): the gain
over continued training, (FID_continued - FID_deme) / FID_continued per training seed, paired by seed: "reproduced"
if the control holds, the 95% t-interval over the 6 seeds lies above 0 and the mean gain is at least 5%;
"contradicted" if the interval lies below 0; otherwise "not reproduced (inconclusive at this scale)". The gain of
each over the base is reported too (the paper's other comparison), not read.

`--quick` (one seed, S = 20, two 200-step pre-training stages, 200 samples per FID) only checks that everything
runs; its numbers are not read.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch

import merge_timestep_models
import train_deme
from benchmarks.small_fid import cached_fid, train_and_save
from benchmarks.verdicts import t_interval, verdict
from fixtures.in_process import run_script
from fixtures.offline_data import sklearn_digits, write_image_folder
from fixtures.small_unet import build_ddpm_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = ["--num_ranges", "1", "--global_sample_prob", "1", "--consistency_weight", "0", "--channel_projection", "none"]
SAMPLING_SEEDS = (0, 10_000)
ARMS = {  # name: (flags, steps as a multiple of S)
    "continued": (PLAIN, 4),
    "deme": (["--num_ranges", "4", "--global_sample_prob", "0.4", "--consistency_weight", "1",
              "--channel_projection", "official"], 1),
}
UNET_FILES = shutil.ignore_patterns("checkpoint-*", "logs", "*.png", "README.md", "*.tmp*", ".created_by.json")


class DigitFeatures(torch.nn.Module):
    """FID features for 8x8 digits: a small CNN classifier's penultimate layer (64-d)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 64),
            torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):  # float NCHW RGB in [0, 1], any size -> 64 features
        return self.body(torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False))


def write_data(root):
    """(train folder, held-out folder): class folders of PNGs, split seed 0, and the training arrays."""
    images, labels, names = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, held = order[:-500], order[-500:]
    folders = []
    for part, rows in (("train", train), ("held_out", held)):
        path = os.path.join(root, part)
        if not os.path.isdir(path):
            write_image_folder(images[rows], labels[rows], names, path + ".tmp")
            os.replace(path + ".tmp", path)
        folders.append(path)
    return folders, images[train], labels[train]


def feature_extractor(path, images, labels):
    """The FID feature network, trained on the training split only; cached as TorchScript."""
    if os.path.exists(path):
        return path
    x = torch.from_numpy(images).float()[:, None].expand(-1, 3, -1, -1) / 255
    torch.manual_seed(0)  # the network's initial weights
    return train_and_save(DigitFeatures(), x, torch.from_numpy(labels), path)


def train(pipeline, data, out, steps, seed, *flags, lr="2e-4"):
    """One train_deme.py run (skipped when its ranges are finished)."""
    run_script(train_deme, [
        "--pretrained_model_name_or_path", pipeline, "--dataset", data, "--output_dir", out, "--no-random_flip",
        "--train_batch_size", "64", "--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
        "--resume_from_checkpoint", "latest", "--learning_rate", lr, "--lr_scheduler", "cosine", "--use_ema",
        "--ema_decay", "0.999",
        "--validation_steps", "0", "--num_validation_images", "8", "--validation_inference_steps", "25",
        "--report_to", "none", "--skip_image_check", "--seed", str(seed), *flags])


def as_pipeline(base_pipeline, unet_folder, out):
    """`base_pipeline` with the UNet of `unet_folder` (its official projections, if any, travel with it)."""
    if not os.path.exists(os.path.join(out, "model_index.json")):
        shutil.rmtree(out + ".tmp", ignore_errors=True)
        shutil.copytree(base_pipeline, out + ".tmp", ignore=shutil.ignore_patterns("unet", "README.md"))
        shutil.copytree(unet_folder, os.path.join(out + ".tmp", "unet"), ignore=UNET_FILES)
        os.replace(out + ".tmp", out)
    return out


def merge(base, runs, out, *flags):
    if not os.path.exists(os.path.join(out, "README.md")):
        merge_timestep_models.main(merge_timestep_models.parse_args([
            "--base_model", base, "--models", runs, "--output_dir", out, *flags]))
    return out


def fid(model, base, reference, extractor, samples, report):
    """Mean FID over the sampling seeds (each report cached in `report`_<seed>.json)."""
    return float(np.mean([cached_fid(model, reference, extractor, samples, f"{report}_{seed}.json",
                                     "--scheduler_model", base, "--seed", str(seed), batch_size=250)[0]
                          for seed in SAMPLING_SEEDS]))


def gains(results, arm, baseline, seeds):
    """Per-seed relative FID gain of `arm` over `baseline` (positive: `arm` is better)."""
    return [(results[baseline][str(s)] - results[arm][str(s)]) / results[baseline][str(s)] for s in seeds]


def plot(pretrain, results, base_fid, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1]})
    ax = axes[0]
    ax.plot(np.cumsum([s["steps"] for s in pretrain]), [s["fid"] for s in pretrain], marker="o")
    ax.set_xlabel("pre-training step (stages of cosine-decayed lr)")
    ax.set_ylabel("FID vs held-out digits")
    ax.set_title("base: pre-training until two stages move FID < 2%", fontsize=9)
    ax = axes[1]
    names = list(results)
    for i, name in enumerate(names):
        values = [results[name][str(s)] for s in seeds]
        ax.scatter([i] * len(values), values, color="C0", s=14)
        ax.errorbar([i], [np.mean(values)], fmt="_", color="k", markersize=20)
    ax.axhline(base_fid, color="C3", linestyle="--", label="base (pre-trained)")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FID (dots: training seeds; bar: mean)")
    ax.set_title(f"1,000 more steps after the base, {len(seeds)} training seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pretrain_base(w, init, data, held, extractor, samples, stage_steps, max_stages):
    """Stages of cosine-decayed training until two consecutive stages each move FID by < 2% (or the budget ends)."""
    pretrain, base, converged = [], init, False
    for stage in range(max_stages):
        lr = "1e-3" if stage == 0 else "2e-4"
        out = os.path.join(w, "pretrain", f"stage{stage}")
        train(base, data, out, stage_steps, 1000 + stage, *PLAIN, lr=lr)
        base = as_pipeline(init, os.path.join(out, "range_0"), os.path.join(w, "pretrain", f"stage{stage}_pipeline"))
        pretrain.append({"stage": stage, "lr": float(lr), "steps": stage_steps,
                         "fid": fid(base, init, held, extractor, samples, os.path.join(w, "reports", f"base{stage}"))})
        if stage:
            pretrain[-1]["change"] = (pretrain[-1]["fid"] - pretrain[-2]["fid"]) / pretrain[-2]["fid"]
        print(f"pre-training stage {stage} (lr {lr}, cosine): FID {pretrain[-1]['fid']:.2f}", flush=True)
        converged = len(pretrain) >= 3 and all(abs(s["change"]) < 0.02 for s in pretrain[-2:])
        if converged:
            break
    return pretrain, base, converged


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="benchmarks_out/deme_table_v2",
                   help="Models, data and reports (not committed).")
    p.add_argument("--quick", action="store_true", help="A smoke run: nothing is read from it.")
    a = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(1)  # 2 cores: two intra-op threads under load were 10x slower than one
    if a.quick:
        seeds, S, stage_steps, max_stages, samples = [0], 20, 200, 2, 200
    else:
        seeds, S, stage_steps, max_stages, samples = list(range(6)), 250, 2000, 12, 2000
    w = os.path.abspath(a.work_dir + ("_quick" if a.quick else ""))
    os.makedirs(os.path.join(w, "reports"), exist_ok=True)
    started = time.time()
    (data, held), train_images, train_labels = write_data(os.path.join(w, "data"))
    extractor = feature_extractor(os.path.join(w, "digit_features.pt"), train_images, train_labels)
    init = os.path.join(w, "init")
    if not os.path.exists(os.path.join(init, "model_index.json")):
        build_ddpm_pipeline(resolution=8, channels=(16, 32)).save_pretrained(init + ".tmp")
        os.replace(init + ".tmp", init)
    pretrain, base, converged = pretrain_base(w, init, data, held, extractor, samples, stage_steps, max_stages)
    base_fid = pretrain[-1]["fid"]

    # ---- The arms, paired by training seed.
    results = {}
    for seed in seeds:
        for arm, (flags, multiple) in ARMS.items():
            run = os.path.join(w, "runs", arm, str(seed))
            t0 = time.time()
            train(base, data, run, multiple * S, seed, *flags)
            reports = os.path.join(w, "reports", f"{arm}_{seed}")
            if arm == "deme":
                models = {"deme: merged, w = 1/4": merge(base, run, run + "_uniform"),
                          "deme: ensemble (before merge)": merge(base, run, run + "_ensemble", "--ensemble")}
            else:
                models = {arm: as_pipeline(init, os.path.join(run, "range_0"), run + "_pipeline")}
            for i, (name, model) in enumerate(models.items()):
                results.setdefault(name, {})[str(seed)] = fid(model, base, held, extractor, samples, f"{reports}_{i}")
                print(f"seed {seed} {name}: FID {results[name][str(seed)]:.2f} ({time.time() - t0:.0f} s, "
                      f"{(time.time() - started) / 60:.0f} min in all)", flush=True)

    control = [(base_fid - results["continued"][str(s)]) / base_fid for s in seeds]
    c_mean, c_lo, c_hi = t_interval(control)
    void = c_lo > 0 and c_mean >= 0.02
    rows = {}
    for name in results:
        g = gains(results, name, "continued", seeds) if name != "continued" else None
        rows[name] = {"fid": [results[name][str(s)] for s in seeds],
                      "gain_vs_continued": t_interval(g) if g else None,
                      "gain_vs_base": t_interval([(base_fid - results[name][str(s)]) / base_fid for s in seeds])}
    readings = {name: ("void: continued plain training still improves the base, so the premise fails" if void
                       else verdict(*rows[name]["gain_vs_continued"], minimum=0.05))
                for name in rows if name != "continued"}
    report = {"pretrain": pretrain, "base_converged_by_rule": converged, "base_fid": base_fid,
              "control_gain_over_base": [c_mean, c_lo, c_hi], "comparison_void": void, "rows": rows,
              "readings": readings, "seeds": seeds, "S": S, "samples_per_fid": samples,
              "minutes": (time.time() - started) / 60}
    with open(os.path.join(w, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    out = os.path.join(ROOT, "benchmarks") if not a.quick else w
    plot(pretrain, results, base_fid, seeds, os.path.join(out, "deme_table.png"))

    def pct(g):
        return f"{100 * g[0]:+.1f}% [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]"

    lines = [f"| model | FID per training seed (mean of 2 x {samples} samples, vs 500 held-out digits) | mean | gain "
             "vs continued, mean [95% CI] | gain vs base | reading |", "|---|---|---|---|---|---|",
             f"| base (pre-trained, {sum(s['steps'] for s in pretrain)} steps) | - | {base_fid:.2f} | - | - | - |"]
    for name, row in rows.items():
        g = row["gain_vs_continued"]
        lines.append(f"| {name} | {', '.join(f'{v:.2f}' for v in row['fid'])} | {np.mean(row['fid']):.2f} | "
                     f"{pct(g) if g else '-'} | {pct(row['gain_vs_base'])} | {readings.get(name, 'control')} |")
    stage_fids = ", ".join(f"{stage['fid']:.2f}" for stage in pretrain)
    lines += ["", f"Base converged by the stage rule: {converged} (stage FIDs {stage_fids}). "
              f"Control: continued training's gain over the base "
              f"{pct((c_mean, c_lo, c_hi))} -> {'VOID' if void else 'holds'}. "
              f"Wall time {(time.time() - started) / 60:.0f} min."]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "deme_table.md"), "w") as f:
        f.write(f"Command: `python -m benchmarks.deme_table{' --quick' if a.quick else ''}` (design and rule: "
                f"`benchmarks/deme_table.py`, version 2)\n\n{table}\n")


if __name__ == "__main__":
    main()
