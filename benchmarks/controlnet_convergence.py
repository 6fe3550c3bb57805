"""Does Diff-Tuning make a ControlNet converge sooner? The paper's ControlNet claim ("24% faster convergence") at
toy scale on 2 CPU cores, version 2: a budget, control and threshold at which plain training actually converges
(about 45 minutes with the source cached; resumable: finished runs are kept).

    python -m benchmarks.controlnet_convergence [--work_dir benchmarks_out/controlnet2]

Fixed before the paired runs of version 2 (this docstring was written after the pilot below and before any paired
run; the results go to benchmarks/RESULTS.md whichever way they go). Version 1 (2026-11-24, RESULTS.md) could not
show the effect: its threshold was crossed at step 50-100 while no ControlNet followed the edges (lr 1e-4, 1,000
steps, Canny); the threshold measured an early drift, not convergence.

Source model. The text-to-image benchmark's source (`benchmarks.text_to_image.build_source`, cached in
`--source_work_dir`, shared with it): a small Stable-Diffusion-style pipeline of stock diffusers parts
(AutoencoderKL, a random frozen CLIP text encoder with a character tokenizer, UNet2DConditionModel (32, 64), 16 px
images, 8 px latents) pre-trained for 4,000 steps on MNIST digits 0-4 captioned "a handwritten digit N", captions
dropped 10% (so classifier-free guidance has an unconditional branch).

Downstream data. sklearn's 8x8 digits (all ten) upscaled to 16 px (nearest neighbour), with XDoG sketch controls
(`--condition sketch`, the annotator's defaults) and the same captions, in diffusers' metadata.jsonl layout: 1,200
training rows; a fixed, disjoint held-out folder of 32 rows for the tracker.

The pilot (seed 100, standard arm only; it chose the setting and is not among the paired seeds). Candidates, in the
order tried, with the rule "the first setting whose halfway threshold (below) plain training crosses at step >= 300
and whose final samples visibly follow the controls": Canny at lr 1e-3 for 1,000 steps (crossed halfway at step
150; samples follow the edges faintly), Canny at lr 3e-4 for 2,000 steps (crossed at 350, samples barely follow:
1-px edges at 16 px are a weak control), sketch at lr 1e-3 for 2,000 steps (blurred-sketch SSIM -0.04 at step 0,
0.07 at 100, 0.32 at 250, about 0.44 from step 450 on: the jump of sudden convergence, and the samples follow the
strokes; but halfway is crossed at step 200), sketch at lr 3e-4 for 2,000 steps (-0.04 at step 0, still
-0.02 at 100, 0.15 at 300, 0.21 at 450, 0.34 at 800, 0.43 over the last three evaluations; halfway, 0.19, crossed
at step 450; the final samples follow the strokes): chosen. The paired runs re-run the
chosen pilot inside the benchmark (same seed, same numbers) to set the thresholds.

Arms (2,000 steps, batch 8, lr 3e-4 constant, no EMA, the ControlNet copied from the source UNet):
  standard        plain ControlNet training (--method standard)
  paper mix       Diff-Tuning, 50% bank rows, retention weight 1.0 (the paper)
  official mix    Diff-Tuning, 20% bank rows, retention weight 0.1 (thuml/Diffusion-Tuning's DiT code)
The memory bank: 400 samples of the source for the empty prompt (the source's unconditional branch: this toy's
analogue of the paper's generic bank prompt; CFG 3, 20 DDIM steps), each annotated with the same sketch annotator.
Fidelity every 50 steps on the 32 held-out rows (20 DDIM steps, CFG 3): SSIM of the blurred sketch maps (sigma 1 px
at 16 px, the paper's metric), one seed per row, the same for every evaluation and arm.

Seeds. Five paired seeds, 1..5: seed s sets the ControlNet's training randomness in all three arms (same data
order); the bank and the held-out rows are shared.

Thresholds. From the pilot alone: with f0 its step-0 score and f1 the mean of its last three scores, the main
threshold is f0 + 0.5 (f1 - f0) (halfway to what plain training reaches), the others f0 + 0.25 (f1 - f0) and
f0 + 0.75 (f1 - f0). A run converges at the first evaluation at or past the threshold; a run that never gets there
counts as the full budget (censored, reported).

Measures, as the paper reports them: per seed, the relative reduction in steps to the threshold,
r_s = (S_s - D_s) / S_s (S: standard, D: a Diff-Tuning arm); the mean over seeds, with a 95% bootstrap interval
over seeds (10,000 resamples, numpy seed 0); the same at the two other thresholds; and the area under the fidelity
curve (mean score over evaluations), paired differences. Plots: mean curve per arm with the thresholds; the
final held-out samples of seed 1 in each arm, controls above.

Premise checks, reported first (if one fails nothing is read from the step counts): plain training crosses the
main threshold in at least 4 of 5 seeds, and at step 300 or later in at least 4 of 5 seeds (so that there is a
convergence to speed up, not a first-evaluation drift).

Reading rule. "Reproduced" for an arm if, at the main threshold, the interval of its mean r excludes 0 and the
mean is at least 10%; "contradicted" if the interval lies entirely below 0; otherwise "not reproduced
(inconclusive at this scale)". Ceiling caveat, whatever the reading: this is a 16 px toy with a weak source; a
reading here does not speak for SD 1.5 at 512 px.
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.verdicts import bootstrap_mean, verdict

PAIRED_SEEDS = [1, 2, 3, 4, 5]
PILOT_SEED = 100
MIN_CROSSING_STEP = 300
ARMS = {
    "standard": ["--method", "standard"],
    "paper_mix": ["--method", "diff_tuning", "--retention_ratio", "0.5", "--retention_weight", "1.0"],
    "official_mix": ["--method", "diff_tuning", "--retention_ratio", "0.2", "--retention_weight", "0.1"],
}
CAPTION = "a handwritten digit {}"
CONDITION = "sketch"
LEARNING_RATE = "3e-4"


def write_downstream(work):
    """sklearn digits with sketch controls: a training folder and a disjoint held-out folder."""
    from fixtures.offline_data import sklearn_digits, write_control_folder
    from utils.metrics.annotators import make_annotator

    images, labels, names = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(images))
    folders = {}
    for name, rows in (("train", order[:1200]), ("held_out", order[1200:1232])):
        path = os.path.join(work, f"digits_{name}")
        if not os.path.exists(os.path.join(path, "metadata.jsonl")):
            write_control_folder(images[rows], labels[rows], names, path + ".tmp", make_annotator(CONDITION),
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
        folders["held_out"], "--output_dir", out, *ARMS[arm], "--condition", CONDITION, "--resolution", "16",
        "--train_batch_size", "8", "--learning_rate", LEARNING_RATE, "--max_train_steps", str(steps),
        "--seed", str(seed), "--memory_bank", bank, "--memory_bank_prompt", "", "--memory_bank_size", "400",
        "--memory_bank_batch_size", "50",
        "--memory_bank_inference_steps", "20", "--memory_bank_guidance_scale", "3",
        "--num_validation_samples", "32", "--validation_batch_size", "32", "--validation_steps", "50",
        "--validation_inference_steps", "20", "--validation_guidance_scale", "3", "--num_validation_images", "8",
        "--fidelity_blur_sigma", "1", "--convergence_threshold", "0.99", "--checkpointing_steps", "500",
        "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest", "--report_to", "none",
        "--lr_warmup_steps", "0", "--adam_weight_decay", "0"])  # the defaults the recorded runs had
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
    reached = [steps_to(curves["standard"][s]["points"], main, steps) for s in PAIRED_SEEDS]
    crossed = sum(ok for _, ok in reached)
    late = sum(ok and step >= MIN_CROSSING_STEP for step, ok in reached)
    report["premise"] = {"standard_crossings_of_main_threshold": crossed,
                         f"standard_crossings_at_step_{MIN_CROSSING_STEP}_or_later": late,
                         "holds": crossed >= 4 and late >= 4}
    if not report["premise"]["holds"]:
        for arm in ("paper_mix", "official_mix"):
            for name in thresholds:
                report["arms"][arm][name]["reading"] = "not read: the premise failed"
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
    ax.set_ylabel(f"blurred-{CONDITION} SSIM (held out)")
    ax.set_title("ControlNet control fidelity: standard vs Diff-Tuning (toy scale)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_strip(work, path):
    """Seed 1's final held-out samples in each arm (controls above), one grid per arm, stacked."""
    from PIL import Image, ImageDraw

    grids = [(arm, Image.open(os.path.join(work, "runs", f"{arm}_seed{PAIRED_SEEDS[0]}", "samples.png")).convert("RGB"))
             for arm in ARMS]
    width, label = max(g.width for _, g in grids), 14
    out = Image.new("RGB", (width, sum(g.height + label for _, g in grids)), "white")
    y = 0
    for arm, grid in grids:
        ImageDraw.Draw(out).text((2, y + 1), f"{arm}, seed {PAIRED_SEEDS[0]}, final step", fill="black")
        out.paste(grid, (0, y + label))
        y += grid.height + label
    out.resize((out.width // 2, out.height // 2)).save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=os.path.join("benchmarks_out", "controlnet2"),
                   help="Data, bank and runs (not committed; finished runs are reused).")
    p.add_argument("--source_work_dir", default=os.path.join("benchmarks_out", "text_to_image_v3"),
                   help="Where the source model is built or found (shared with benchmarks.text_to_image).")
    p.add_argument("--steps", type=int, default=2000, help="ControlNet training steps of every run.")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from benchmarks.text_to_image import build_source

    torch.set_num_threads(1)  # two intra-op threads under load ran 10x slower on these 2-core machines
    start = time.time()
    os.makedirs(a.work_dir, exist_ok=True)
    source = build_source(a.source_work_dir, 4000)
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
    here = os.path.dirname(os.path.abspath(__file__))
    plot(curves, report, os.path.join(here, "controlnet_convergence.png"))
    sample_strip(a.work_dir, os.path.join(here, "controlnet_samples.png"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
