"""Does Bi-tuning beat plain fine-tuning when labels are scarce? The paper's claim (and tllib's reproduced gains of
+4.6 / +7.2 / +5.6 points at 15% labels on CUB / Cars / Aircraft) at toy scale on 2 CPU cores (about 35 minutes
from scratch; resumable: finished runs are kept).

    python -m benchmarks.bi_tuning [--work_dir benchmarks_out/bi_tuning] [--quick]

Fixed before any run (this docstring was written first; the results go to benchmarks/RESULTS.md whichever way they
go):

Backbones, pre-trained inside the benchmark (no weights can be downloaded), both a transformers ResNet (basic
blocks, widths 16/32/64, one block per stage, 32x32 inputs, ImageNet-style processor) on MNIST-5k digits 0-4
(2,5xx images):
  supervised       train_bi_tuning.py --method standard from random weights, 1,500 steps, batch 64, all lr x1;
  self-supervised  SimCLR (NT-Xent, T 0.2, a 2-layer projection MLP discarded afterwards, the same crops and flips),
                   1,500 steps, batch 64, SGD lr 0.05 momentum 0.9.
Target: sklearn digits 5-9 (new classes, another digitisation: 8x8 upsampled), 30% of each class held out
(stratified, split seed 0, the same for every run). Label fractions 5/15/30/50/100% of the rest, per class.

Arms (all through train_bi_tuning.py, defaults except: batch 16, 300 steps, lr decay x0.1 at step 180, key
momentum 0.99 so the key encoder's time constant stays a third of the run as 1,000 of 10,000 is a tenth):
  standard          --method standard
  bi_tuning         both contrastive losses, weight 1
  projector_only    --classifier_contrast_weight 0
  contrast_only     --projector_loss_weight 0
Seeds 1, 2, 3, paired: seed s picks the same label subset and data order in every arm.

Measures: held-out accuracy after the LAST step (never a best step); per fraction and backbone the mean and std
over seeds and the paired difference to standard (mean, 95% t-interval with 2 degrees of freedom); the step-time
ratio of Bi-tuning over standard (the median interval between optimizer steps inside runs of 120 steps, five
interleaved repeats; median and range).

Premise checks, reported first: (a) the supervised backbone reaches >= 95% on held-out digits 0-4 (it learned its
source task); (b) each backbone transfers: standard fine-tuning from it beats the same network from random
weights at 15% labels by >= 3 points (mean of 3 seeds). A backbone failing (b) is a negative control: nothing is
read from its Bi-tuning numbers.

Reading rule, per backbone that passes the premises: pool the paired differences bi_tuning - standard at the low
label fractions 5/15/30% (9 pairs). "Reproduced" if the pooled mean is >= 1 point and its 95% t-interval excludes
0; "contradicted" if the interval lies entirely below 0; otherwise "not reproduced (inconclusive at this scale)".
`--quick` (1 seed, fractions 15 and 100%, 60 steps, 300 pre-training steps) only checks that everything runs; its
numbers are not read.
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.verdicts import t_interval, verdict

FRACTIONS = [0.05, 0.15, 0.3, 0.5, 1.0]
SEEDS = [1, 2, 3]
ARMS = {
    "standard": ["--method", "standard"],
    "bi_tuning": [],
    "projector_only": ["--classifier_contrast_weight", "0"],
    "contrast_only": ["--projector_loss_weight", "0"],
}
LOW = [0.05, 0.15, 0.3]


def backbone_config():
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
                        downsample_in_first_stage=False, num_labels=5)


def processor():
    from transformers import ConvNextImageProcessor

    # 32 px inputs: short side resized to 32 / 0.875, centre crop 32 (the ImageNet recipe, scaled down)
    return ConvNextImageProcessor(size={"shortest_edge": 32})


def save_dataset(images, labels, names, path, classes):
    """The rows of `classes` as a save_to_disk dataset with a ClassLabel of their names (cached)."""
    import datasets
    from PIL import Image

    if os.path.exists(os.path.join(path, "state.json")):
        return path
    keep = np.isin(labels, classes)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(i).convert("RGB") for i in images[keep]],
         "label": [classes.index(int(y)) for y in labels[keep]]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=[names[c] for c in classes])}))
    ds.save_to_disk(path)
    return path


def run(out, model, data, *flags):
    """train_bi_tuning.py in this process (or the finished result of an earlier run)."""
    import train_bi_tuning
    from fixtures.in_process import run_script

    done = os.path.join(out, "all_results.json")
    if not os.path.exists(done):
        run_script(train_bi_tuning, ["--pretrained_model_name_or_path", model, "--dataset", data, "--output_dir",
                                     out, "--report_to", "none", "--skip_image_check", *flags])
    with open(done) as f:
        return json.load(f)


def random_backbone(work):
    """The backbone's architecture with random weights (the 'from scratch' control and the start of pre-training)."""
    import torch
    from transformers import ResNetForImageClassification

    path = os.path.join(work, "backbones", "random")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        ResNetForImageClassification(backbone_config()).save_pretrained(path)
        processor().save_pretrained(path)
    return path


def supervised_backbone(work, source, steps):
    out = os.path.join(work, "backbones", "supervised")
    results = run(out, random_backbone(work), source, "--method", "standard", "--max_train_steps", str(steps),
                  "--train_batch_size", "64", "--backbone_lr_scale", "1", "--learning_rate", "0.05",
                  "--validation_steps", "0", "--checkpointing_steps", str(steps), "--seed", "0")
    return out, results["eval_accuracy"]


def simclr_backbone(work, source, steps):
    """SimCLR on the source images: two crops+flips per image, NT-Xent over the batch, a projection MLP on the
    pooled features (discarded); the encoder is saved as a stock classifier folder with an unused head."""
    import datasets
    import torch
    import torch.nn.functional as F
    from transformers import ResNetForImageClassification

    from utils.families.image_classifiers import input_size, normalisation
    from utils.infra.augmentation import as_uint8_tensor, normalise, random_resized_views

    out = os.path.join(work, "backbones", "self_supervised")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    torch.manual_seed(0)
    model = ResNetForImageClassification.from_pretrained(random_backbone(work)).train()
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    optimizer = torch.optim.SGD([*model.resnet.parameters(), *mlp.parameters()], lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    proc = processor()
    size, (rescale, mean, std) = input_size(proc), normalisation(proc)
    ds = datasets.load_from_disk(source)
    images = [as_uint8_tensor(img) for img in ds["image"]]
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = [images[i] for i in torch.randint(0, len(images), (64,), generator=g)]
        views = [normalise(random_resized_views(batch, size, g), rescale, mean, std) for _ in range(2)]
        z = F.normalize(mlp(model.resnet(torch.cat(views)).pooler_output.flatten(1)), dim=1)
        sims = z @ z.T / 0.2
        sims.fill_diagonal_(float("-inf"))
        targets = torch.cat([torch.arange(64, 128), torch.arange(64)])
        loss = F.cross_entropy(sims, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            print(f"simclr step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def fine_tune(work, backbone_name, backbone, target, arm, fraction, seed, steps):
    out = os.path.join(work, "runs", backbone_name, arm, f"f{fraction:g}", f"seed{seed}")
    flags = [*ARMS.get(arm, ARMS["standard"]), "--train_batch_size", "16", "--max_train_steps", str(steps),
             "--lr_decay_steps", str(round(0.6 * steps)), "--key_momentum", "0.99", "--validation_steps", "0",
             "--checkpointing_steps", str(steps), "--seed", str(seed), "--train_val_split", "0.3"]
    if fraction < 1:
        flags += ["--train_fraction", str(fraction)]
    return run(out, backbone, target, *flags)["eval_accuracy"]


def step_time_ratio(work, backbone, target, repeats=5, steps=120, warmup=10):
    """Per-step time of Bi-tuning over standard: the median interval between optimizer steps inside a run (timers in
    the process: loading, evaluation and saving do not count), runs interleaved with the order alternating."""
    import shutil
    import statistics

    import train_bi_tuning

    real = train_bi_tuning.log_step
    ratios = []
    for r in range(repeats):
        per_step = {}
        for arm in ("standard", "bi_tuning") if r % 2 == 0 else ("bi_tuning", "standard"):
            stamps = []

            def timed_log_step(*args, **kwargs):
                stamps.append(time.perf_counter())
                return real(*args, **kwargs)

            out = os.path.join(work, "timing", f"{arm}-{r}")
            shutil.rmtree(out, ignore_errors=True)
            train_bi_tuning.log_step = timed_log_step
            try:
                run(out, backbone, target, *ARMS[arm], "--train_batch_size", "16", "--max_train_steps", str(steps),
                    "--validation_steps", "0", "--checkpointing_steps", str(steps), "--seed", "1",
                    "--train_val_split", "0.3")
            finally:
                train_bi_tuning.log_step = real
            per_step[arm] = statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))
        ratios.append(per_step["bi_tuning"] / per_step["standard"])
        print(f"timing repeat {r}: standard {per_step['standard'] * 1e3:.1f} ms/step, bi_tuning "
              f"{per_step['bi_tuning'] * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}", flush=True)
    return ratios


def analyse(acc, scratch, source_accuracy, fractions, seeds):
    """The report: premises, per-fraction table, pooled reading per backbone."""
    report = {"source_accuracy": source_accuracy, "premise_a": source_accuracy >= 0.95, "backbones": {}}
    for name, arms in acc.items():
        std15 = float(np.mean([arms["standard"][0.15 if 0.15 in fractions else fractions[0]][s] for s in seeds]))
        scratch15 = float(np.mean(list(scratch.values())))
        entry = {"standard_15": std15, "scratch_15": scratch15, "premise_b": std15 - scratch15 >= 0.03, "table": {}}
        for arm in ARMS:
            for f in fractions:
                values = [arms[arm][f][s] for s in seeds]
                diffs = [arms[arm][f][s] - arms["standard"][f][s] for s in seeds]
                entry["table"][f"{arm}@{f:g}"] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                                  "diff": t_interval(diffs)}
        pooled = [arms["bi_tuning"][f][s] - arms["standard"][f][s] for f in fractions if f in LOW for s in seeds]
        mean, lo, hi = t_interval(pooled)
        entry["pooled_low_label_diff"] = (mean, lo, hi)
        entry["reading"] = verdict(mean, lo, hi, minimum=0.01) if entry["premise_b"] and report["premise_a"] else \
            "negative control (premise failed): not read"
        report["backbones"][name] = entry
    return report


def plot(report, acc, fractions, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(acc), figsize=(6 * len(acc), 4.2), squeeze=False)
    for ax, (name, arms) in zip(axes[0], acc.items()):
        for arm in ARMS:
            means = [100 * np.mean([arms[arm][f][s] for s in seeds]) for f in fractions]
            stds = [100 * np.std([arms[arm][f][s] for s in seeds]) for f in fractions]
            ax.errorbar([100 * f for f in fractions], means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
        ax.set_xlabel("labels used (per class)")
        ax.set_ylabel("held-out accuracy after the last step (%)")
        ax.set_title(f"{name} backbone: {report['backbones'][name]['reading']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Bi-tuning vs standard fine-tuning, sklearn digits 5-9 from MNIST 0-4 backbones (mean, std of "
                 f"{len(seeds)} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="benchmarks_out/bi_tuning")
    p.add_argument("--quick", action="store_true", help="A smoke run: nothing is read from it.")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)  # 2 cores: two intra-op threads under load were 10x slower than one
    from fixtures.offline_data import mnist_5k, sklearn_digits

    fractions, seeds, steps, pre_steps = (([0.15, 1.0], [1], 60, 300) if a.quick else (FRACTIONS, SEEDS, 300, 1500))
    work = a.work_dir + ("_quick" if a.quick else "")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    source = save_dataset(*mnist_5k(), os.path.join(work, "data", "mnist_0_4"), [0, 1, 2, 3, 4])
    target = save_dataset(*sklearn_digits(), os.path.join(work, "data", "digits_5_9"), [5, 6, 7, 8, 9])
    supervised, source_accuracy = supervised_backbone(work, source, pre_steps)
    print(f"supervised backbone: held-out accuracy on digits 0-4 {source_accuracy:.3f} "
          f"({time.time() - started:.0f} s)", flush=True)
    backbones = {"supervised": supervised, "self_supervised": simclr_backbone(work, source, pre_steps)}
    print(f"backbones ready ({time.time() - started:.0f} s)", flush=True)
    scratch = {s: fine_tune(work, "random", random_backbone(work), target, "standard", 0.15 if 0.15 in fractions
                            else fractions[0], s, steps) for s in seeds}
    acc = {}
    for name, path in backbones.items():
        acc[name] = {arm: {f: {} for f in fractions} for arm in ARMS}
        for f in fractions:
            for s in seeds:
                for arm in ARMS:
                    acc[name][arm][f][s] = fine_tune(work, name, path, target, arm, f, s, steps)
                print(f"{name} {f:g} seed {s}: " + ", ".join(f"{arm} {acc[name][arm][f][s]:.3f}" for arm in ARMS)
                      + f" ({time.time() - started:.0f} s)", flush=True)
    ratios = step_time_ratio(work, supervised, target, repeats=1 if a.quick else 5)
    report = analyse(acc, scratch, source_accuracy, fractions, seeds)
    report.update(step_time_ratios=ratios, scratch=scratch, seconds=time.time() - started,
                  accuracy={n: {arm: {f"{f:g}": v for f, v in fs.items()} for arm, fs in arms.items()}
                            for n, arms in acc.items()})
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    png = "benchmarks/bi_tuning.png" if not a.quick else os.path.join(work, "bi_tuning.png")
    plot(report, acc, fractions, seeds, png)
    print(json.dumps({k: v for k, v in report.items() if k != "accuracy"}, indent=1, default=str))


if __name__ == "__main__":
    main()
