"""Does Diff-Tuning make a ControlNet converge sooner? The paper's ControlNet claim ("24% faster convergence") at
toy scale on 2 CPU cores (about 35-45 minutes from scratch; resumable: finished runs are kept).

    python -m benchmarks.controlnet_convergence [--work_dir benchmarks_out/controlnet] [--steps 1000]

Fixed before any run (this docstring was written first; the results are appended to benchmarks/RESULTS.md
whichever way they go):

Source model. A small Stable-Diffusion-style pipeline of stock diffusers parts (AutoencoderKL, a random frozen CLIP
text encoder with a character tokenizer of 32 tokens, UNet2DConditionModel, 16 px images, 8 px latents),
pre-trained on MNIST-5k with captions "a handwritten digit N": the VAE fitted for 600 steps, then the UNet for
`--source_steps` steps of plain denoising (train_deme.py with one range, i.e. ordinary training). Cached.

Downstream data. sklearn's 8x8 digits upscaled to 16 px (nearest neighbour: a blockier rendering than MNIST), with
Canny controls (sigma 1) and the same captions, in diffusers' metadata.jsonl layout: 1,200 training rows; a fixed,
disjoint held-out folder of 32 rows for the tracker.

Arms (same steps, batch 8, lr 1e-4 constant, no EMA, the ControlNet copied from the source UNet):
  standard        plain ControlNet training (--method standard)
  paper mix       Diff-Tuning, 50% bank rows, retention weight 1.0 (the paper)
  official mix    Diff-Tuning, 20% bank rows, retention weight 0.1 (thuml/Diffusion-Tuning's DiT code)
The memory bank: 400 samples of the source for the default prompt (CFG 3, 20 DDIM steps), each annotated with the
same Canny. Fidelity every 50 steps on the 32 held-out rows (20 DDIM steps, CFG 3): SSIM of the blurred Canny maps
(sigma 1 px at 16 px, the paper's metric), one seed per row, the same for every evaluation and arm.

Seeds. Five paired seeds, 1..5: seed s sets the ControlNet's training randomness in all three arms (same data
order), the bank and the held-out rows are shared. Pilot: seed 100, standard arm only, run first.

Thresholds (the paper's 0.55 SSIM is for 512 px COCO and means nothing here). From the pilot alone: with f0 its
step-0 score and f1 the mean of its last three scores, the main threshold is f0 + 0.5 (f1 - f0) (halfway to what
plain training reaches), the others f0 + 0.25 (f1 - f0) and f0 + 0.75 (f1 - f0). A run converges at the first
evaluation past the threshold (patience 1); a run that never gets there counts as `--steps` (censored, reported).

Measures, as the paper reports them: per seed, the relative reduction in steps to the threshold,
r_s = (S_s - D_s) / S_s (S: standard, D: a Diff-Tuning arm); the mean over seeds, with a 95% bootstrap interval
over seeds (10,000 resamples, numpy seed 0); the same at the two other thresholds; and the area under the fidelity
curve (mean score over evaluations), paired differences. Plot: mean curve per arm with the thresholds.

Reading rule. "Reproduced" for an arm if, at the main threshold, the interval of its mean r excludes 0 and the
mean is at least 10%; "contradicted" if the interval lies entirely below 0; otherwise "not reproduced
(inconclusive at this scale)". Premise check, reported first: plain training must cross the main threshold in at
least 4 of 5 seeds (otherwise the step counts are mostly censored and nothing is read from them).
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.verdicts import bootstrap_mean, verdict

PAIRED_SEEDS = [1, 2, 3, 4, 5]
PILOT_SEED = 100
ARMS = {
    "standard": ["--method", "standard"],
    "paper_mix": ["--method", "diff_tuning", "--retention_ratio", "0.5", "--retention_weight", "1.0"],
    "official_mix": ["--method", "diff_tuning", "--retention_ratio", "0.2", "--retention_weight", "0.1"],
}
CAPTION = "a handwritten digit {}"


def build_source(work, steps):
    """The small SD pipeline pre-trained on MNIST-5k (cached in <work>/source)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image

    import train_deme
    from fixtures.in_process import run_script
    from fixtures.offline_data import mnist_5k
    from fixtures.small_dit import train_vae
    from fixtures.small_unet import build_sd_pipeline
    from utils.infra.data import to_tensor

    source = os.path.join(work, "source")
    if os.path.exists(os.path.join(source, "model_index.json")):
        return source
    images, labels, names = mnist_5k()
    data = os.path.join(work, "mnist_captioned")
    if not os.path.exists(os.path.join(data, "metadata.jsonl")):
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, "metadata.jsonl.tmp"), "w") as f:
            for i, (img, label) in enumerate(zip(images, labels)):
                Image.fromarray(img).convert("RGB").save(os.path.join(data, f"{i:05d}.png"))
                f.write(json.dumps({"file_name": f"{i:05d}.png", "text": CAPTION.format(names[label])}) + "\n")
        os.replace(os.path.join(data, "metadata.jsonl.tmp"), os.path.join(data, "metadata.jsonl"))
    init = os.path.join(work, "source_init")
    if not os.path.exists(os.path.join(init, "model_index.json")):
        pipe = build_sd_pipeline(os.path.join(work, "tokenizer_src"), resolution=16, max_length=32,
                                 unet_channels=(32, 64), seed=0)
        pixels = torch.stack([to_tensor(Image.fromarray(img), 16) for img in images])
        train_vae(pipe.vae, pixels, 600, seed=0)
        pipe.save_pretrained(init)
    run_script(train_deme, ["--pretrained_model_name_or_path", init, "--dataset", data,
                            "--output_dir", os.path.join(work, "source_training"), "--num_ranges", "1",
                            "--global_sample_prob", "1", "--consistency_weight", "0", "--channel_projection", "none",
                            "--max_train_steps", str(steps), "--train_batch_size", "64", "--learning_rate", "1e-3",
                            "--lr_scheduler", "cosine", "--lr_warmup_steps", "100", "--checkpointing_steps",
                            str(steps), "--validation_steps", "0", "--report_to", "none",
                            "--resume_from_checkpoint", "latest", "--validation_inference_steps", "20"])
    pipe = StableDiffusionPipeline.from_pretrained(init)
    pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(work, "source_training", "range_0"))
    pipe.save_pretrained(source + ".tmp")
    os.replace(source + ".tmp", source)
    return source


def write_downstream(work):
    """sklearn digits with Canny controls: a training folder and a disjoint held-out folder."""
    from fixtures.offline_data import sklearn_digits, write_control_folder
    from utils.families.annotators import make_annotator

    images, labels, names = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(images))
    folders = {}
    for name, rows in (("train", order[:1200]), ("held_out", order[1200:1232])):
        path = os.path.join(work, f"digits_{name}")
        if not os.path.exists(os.path.join(path, "metadata.jsonl")):
            write_control_folder(images[rows], labels[rows], names, path + ".tmp", make_annotator("canny"),
                                 caption=CAPTION)
            os.replace(path + ".tmp", path)
        folders[name] = path
    return folders


def run_arm(work, source, folders, arm, seed, steps, bank):
    """One ControlNet training run; returns its convergence curve (cached once finished)."""
    import train_diff_tuning_controlnet as script
    from fixtures.in_process import run_script

    out = os.path.join(work, "runs", f"{arm}_seed{seed}")
    curve = os.path.join(out, "convergence.json")
    if os.path.exists(os.path.join(out, "README.md")):
        with open(curve) as f:
            return json.load(f)
    run_script(script, [
        "--pretrained_model_name_or_path", source, "--dataset", folders["train"], "--validation_dataset",
        folders["held_out"], "--output_dir", out, *ARMS[arm], "--condition", "canny", "--resolution", "16",
        "--train_batch_size", "8", "--learning_rate", "1e-4", "--max_train_steps", str(steps), "--seed", str(seed),
        "--memory_bank", bank, "--memory_bank_size", "400", "--memory_bank_batch_size", "50",
        "--memory_bank_inference_steps", "20", "--memory_bank_guidance_scale", "3",
        "--num_validation_samples", "32", "--validation_batch_size", "32", "--validation_steps", "50",
        "--validation_inference_steps", "20", "--validation_guidance_scale", "3", "--num_validation_images", "8",
        "--fidelity_blur_sigma", "1", "--convergence_threshold", "0.99", "--checkpointing_steps", "250",
        "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest", "--report_to", "none"])
    with open(curve) as f:
        return json.load(f)


def steps_to(points, threshold, max_steps):
    """First evaluated step at or past the threshold, and whether it was reached."""
    for p in points:
        if p["score"] >= threshold:
            return p["step"], True
    return max_steps, False


def analyse(curves, pilot, steps):
    scores = [p["score"] for p in pilot["points"]]
    f0, f1 = scores[0], float(np.mean(scores[-3:]))
    thresholds = {"main (50%)": f0 + 0.5 * (f1 - f0), "25%": f0 + 0.25 * (f1 - f0), "75%": f0 + 0.75 * (f1 - f0)}
    report = {"pilot": {"f0": f0, "f1": f1}, "thresholds": thresholds, "steps": steps, "arms": {}}
    for name, threshold in thresholds.items():
        reached = {arm: [steps_to(curves[arm][s]["points"], threshold, steps) for s in PAIRED_SEEDS]
                   for arm in ARMS}
        for arm in ("paper_mix", "official_mix"):
            r = [(S - D) / S for (S, _), (D, _) in zip(reached["standard"], reached[arm])]
            mean, lo, hi = bootstrap_mean(r)
            report["arms"].setdefault(arm, {})[name] = {
                "steps": [x for x, _ in reached[arm]], "reached": [ok for _, ok in reached[arm]],
                "standard_steps": [x for x, _ in reached["standard"]],
                "standard_reached": [ok for _, ok in reached["standard"]],
                "relative_reduction": r, "mean": mean, "ci95": [lo, hi],
                "reading": verdict(mean, lo, hi, minimum=0.10)}
    for arm in ("paper_mix", "official_mix"):
        auc = [np.mean([p["score"] for p in curves[arm][s]["points"]])
               - np.mean([p["score"] for p in curves["standard"][s]["points"]]) for s in PAIRED_SEEDS]
        mean, lo, hi = bootstrap_mean(auc)
        report["arms"][arm]["auc_difference"] = {"per_seed": auc, "mean": mean, "ci95": [lo, hi]}
    main = thresholds["main (50%)"]
    crossed = sum(steps_to(curves["standard"][s]["points"], main, steps)[1] for s in PAIRED_SEEDS)
    report["premise"] = {"standard_crossings_of_main_threshold": crossed, "holds": crossed >= 4}
    return report


def plot(curves, report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm, colour in zip(ARMS, ("tab:grey", "tab:blue", "tab:orange")):
        steps = [p["step"] for p in curves[arm][PAIRED_SEEDS[0]]["points"]]
        runs = np.array([[p["score"] for p in curves[arm][s]["points"]] for s in PAIRED_SEEDS])
        ax.plot(steps, runs.mean(0), color=colour, label=f"{arm} (mean of {len(PAIRED_SEEDS)} seeds)")
        ax.fill_between(steps, runs.min(0), runs.max(0), color=colour, alpha=0.15)
    for name, value in report["thresholds"].items():
        ax.axhline(value, color="black", lw=0.8, ls="--" if name.startswith("main") else ":")
    ax.set_xlabel("training step")
    ax.set_ylabel("blurred-Canny SSIM (held out)")
    ax.set_title("ControlNet control fidelity: standard vs Diff-Tuning (toy scale)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=os.path.join("benchmarks_out", "controlnet"),
                   help="Source model, data, bank and runs (not committed; finished runs are reused).")
    p.add_argument("--steps", type=int, default=1000, help="ControlNet training steps of every run.")
    p.add_argument("--source_steps", type=int, default=3000, help="Pre-training steps of the source UNet.")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # two intra-op threads under load ran 10x slower on these 2-core machines
    start = time.time()
    os.makedirs(a.work_dir, exist_ok=True)
    source = build_source(a.work_dir, a.source_steps)
    folders = write_downstream(a.work_dir)
    bank = os.path.join(a.work_dir, "memory_bank")
    print(f"source and data ready after {time.time() - start:.0f} s", flush=True)
    pilot = run_arm(a.work_dir, source, folders, "standard", PILOT_SEED, a.steps, bank)
    curves = {arm: {} for arm in ARMS}
    for seed in PAIRED_SEEDS:
        for arm in ARMS:
            curves[arm][seed] = run_arm(a.work_dir, source, folders, arm, seed, a.steps, bank)
            print(f"{arm} seed {seed} done after {time.time() - start:.0f} s", flush=True)
    report = analyse(curves, pilot, a.steps)
    report["wall_seconds"] = time.time() - start
    with open(os.path.join(a.work_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(curves, report, os.path.join(os.path.dirname(os.path.abspath(__file__)), "controlnet_convergence.png"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
