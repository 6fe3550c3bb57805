"""Does Diff-Tuning transfer a text-to-image model better than plain fine-tuning and DreamBooth's prior preservation?
At toy scale on 2 CPU cores (about 1-1.5 hours from scratch; resumable: finished runs and evaluations are kept).

    python -m benchmarks.text_to_image [--work_dir benchmarks_out/text_to_image] [--quick]

Fixed before any run (this docstring was written first; the results go to benchmarks/RESULTS.md whichever way
they go):

Source model. A small Stable-Diffusion-style pipeline of stock diffusers parts (AutoencoderKL fitted for 600 steps,
a random frozen CLIP text encoder with a character tokenizer of 32 tokens, UNet2DConditionModel (32, 64), 16 px
images, 8 px latents) pre-trained on the MNIST-5k digits 0-4 only, captioned "a handwritten digit N", by
`train_diff_tuning_text_to_image.py --method standard --tuning full` (batch 64, lr 1e-3 cosine, 4,000 steps,
captions dropped to the empty prompt 10% of the time so that classifier-free guidance has an unconditional branch
to work with). Cached.

Version 1 (4,000 source steps, 600 fine-tuning steps) failed premise (a): the source's samples were recognised
71.5% of the time (< 80%); and the first standard run on A100 reached 21.5% target accuracy, below premise (c).
Version 2 (8,000 source steps, 1,500 fine-tuning steps) failed (a) again: 72.0%. The cause is the design, not the
budget: the source never saw the empty prompt, so the guided sampling (CFG 3 against the empty prompt) guided with
an unconditional branch it never learned. By the rule nothing of versions 1 and 2 is read (their evaluations are in
RESULTS.md). Version 3, fixed before it ran: captions dropped to the empty prompt with probability 0.1 in the
source's pre-training and in every fine-tuning run (`--proportion_empty_prompts 0.1`, diffusers' usual), 4,000 source
steps, 1,000 fine-tuning steps; everything else as below.

Digits classifier and feature space: `benchmarks.transfer.MnistFeatures` trained here on MNIST-5k and sklearn's
digits (all ten classes, both renderings), 1,500 steps; its logits classify samples and its 128 features give FID.

Targets (new classes in another rendering): sklearn's digits 5-9 at 16 px (nearest neighbour), captioned the same
way, A10 = 10 and A100 = 100 training images per class; the rest of 5-9 is the held-out reference.

Arms (LoRA rank 16 on the UNet's attention, `--steps` 1,000, batch 8, lr 1e-3 constant, captions dropped 10%,
seeds 1, 2, 3 paired):
  standard        plain fine-tuning (uniform t, no bank)
  prior_pres      DreamBooth's prior preservation: class images of the SOURCE prompts ("a handwritten digit 0..4"),
                  bank rows on their prompt, uniform t, prior_loss_weight 1, 4 class + 4 data rows per step
  dt_paper        Diff-Tuning, the paper's mix: 50% bank rows, retention weight 1, xi paper, tau 1
  dt_official     Diff-Tuning, the official code's mix: 20% bank rows, retention weight 0.1
All banks: 400 samples of the source for the source prompts (CFG 3, 20 DDIM steps); Diff-Tuning rows on the empty
prompt. One bank serves every arm (prior preservation with bank_condition prompt).

Measures (each model: 40 samples per prompt, CFG 3, 20 DDIM steps, seeds 1000 + i, the same for every model):
  target accuracy   the classifier's accuracy on samples of the five target prompts (is it the asked digit?)
  target FID        FID (classifier features) of the 200 target samples against the held-out target images
  source accuracy   the classifier's accuracy on samples of the five SOURCE prompts (forgetting: the source model's
                    own value is the ceiling)
  memorisation      share of target samples whose nearest neighbour (features) is a training image rather than one
                    of as many held-out images (A10 only is informative)

Premise checks, reported first; if one fails, nothing below it is read and the benchmark says so:
  (a) the source's samples of its own prompts are recognised as the asked digit >= 80% of the time;
  (b) the classifier recognises >= 90% of the held-out target images (it can judge the target at all);
  (c) standard fine-tuning on A100 reaches >= 50% target accuracy (the budget can learn the new classes).

Reading rule, per Diff-Tuning arm and target, paired over the 3 seeds with a 95% t-interval: "reproduced" if the
target FID is lower than standard's by >= 5% (relative) with the interval of the paired relative difference below 0
AND the source accuracy is not lower than standard's (interval of the paired difference not entirely below 0);
"contradicted" if the target FID interval lies entirely above 0; else "not reproduced (inconclusive)". The same rule
compares each Diff-Tuning arm with prior preservation (secondary). `--quick` (A10, one seed, 100 steps) checks that
the pipeline runs; its numbers are not read.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.small_fid import train_and_save
from benchmarks.transfer import MnistFeatures
from benchmarks.verdicts import t_interval

SOURCE_CLASSES, TARGET_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
CAPTION = "a handwritten digit {}"
SEEDS = [1, 2, 3]
ARMS = {
    "standard": ["--method", "standard"],
    "prior_pres": ["--method", "prior_preservation", "--retention_weight", "1.0", "--train_batch_size", "4"],
    "dt_paper": ["--method", "diff_tuning", "--retention_ratio", "0.5", "--retention_weight", "1.0"],
    "dt_official": ["--method", "diff_tuning", "--retention_ratio", "0.2", "--retention_weight", "0.1"],
}
SAMPLES_PER_PROMPT = 40


def prompts(classes, names):
    return [CAPTION.format(names[c]) for c in classes]


def build_source(work, steps):
    """The small SD pipeline pre-trained on MNIST digits 0-4 (cached in <work>/source)."""
    from PIL import Image

    import train_diff_tuning_text_to_image as script
    from fixtures.in_process import run_script
    from fixtures.offline_data import mnist_5k, write_captioned_folder
    from fixtures.small_dit import train_vae
    from fixtures.small_unet import build_sd_pipeline
    from utils.infra.data import to_tensor

    source = os.path.join(work, "source")
    if os.path.exists(os.path.join(source, "model_index.json")):
        return source
    images, labels, names = mnist_5k()
    keep = np.isin(labels, SOURCE_CLASSES)
    data = os.path.join(work, "source_data")
    if not os.path.exists(os.path.join(data, "metadata.jsonl")):
        write_captioned_folder(images[keep], labels[keep], names, data + ".tmp", caption=CAPTION)
        os.replace(data + ".tmp", data)
    init = os.path.join(work, "source_init")
    if not os.path.exists(os.path.join(init, "model_index.json")):
        pipe = build_sd_pipeline(os.path.join(work, "tokenizer_src"), resolution=16, max_length=32,
                                 unet_channels=(32, 64), seed=0)
        pixels = torch.stack([to_tensor(Image.fromarray(img), 16) for img in images[keep]])
        train_vae(pipe.vae, pixels, 600, seed=0)
        pipe.save_pretrained(init)
    training = os.path.join(work, "source_training")
    run_script(script, ["--pretrained_model_name_or_path", init, "--dataset", data, "--output_dir", training,
                        "--method", "standard", "--tuning", "full", "--resolution", "16", "--random_flip",
                        "--proportion_empty_prompts", "0.1",
                        "--max_train_steps", str(steps), "--train_batch_size", "64", "--learning_rate", "1e-3",
                        "--lr_scheduler", "cosine", "--lr_warmup_steps", "100", "--checkpointing_steps", "500",
                        "--checkpoints_total_limit", "1", "--validation_steps", "0", "--report_to", "none",
                        "--resume_from_checkpoint", "latest", "--validation_inference_steps", "20",
                        "--num_validation_images", "1", "--skip_image_check"])
    os.replace(training, source)
    return source


def write_targets(root):
    """{A10, A100}: (train folder, held-out images float NCHW, held-out labels)."""
    from fixtures.offline_data import sklearn_digits, write_captioned_folder

    images, labels, names = sklearn_digits()
    rng = np.random.default_rng(0)
    rows = {c: rng.permutation(np.flatnonzero(labels == c)) for c in TARGET_CLASSES}
    held = np.concatenate([rows[c][100:] for c in TARGET_CLASSES])
    out = {}
    for name, per_class in (("A10", 10), ("A100", 100)):
        train = np.concatenate([rows[c][:per_class] for c in TARGET_CLASSES])
        path = os.path.join(root, name)
        if not os.path.exists(os.path.join(path, "metadata.jsonl")):
            write_captioned_folder(images[train], labels[train], names, path + ".tmp", caption=CAPTION, size=16)
            os.replace(path + ".tmp", path)
        out[name] = path
    held_x = pixels01(images[held])
    return out, held_x, torch.from_numpy(labels[held])


def pixels01(images):
    """uint8 N x h x w digits as float NCHW RGB in [0, 1] at 16 px (nearest neighbour)."""
    x = torch.from_numpy(images).float()[:, None] / 255
    return torch.nn.functional.interpolate(x, size=(16, 16), mode="nearest").expand(-1, 3, -1, -1).contiguous()


def classifier(path):
    """The digits classifier / feature network on MNIST-5k and sklearn digits, both polarities (TorchScript)."""
    if not os.path.exists(path):
        from fixtures.offline_data import mnist_5k, sklearn_digits

        xs, ys = [], []
        for images, labels, _ in (mnist_5k(), sklearn_digits()):
            x = pixels01(images) if images.shape[1] == 8 else torch.nn.functional.interpolate(
                torch.from_numpy(images).float()[:, None] / 255, size=(16, 16), mode="bilinear",
                align_corners=False).expand(-1, 3, -1, -1)
            xs += [x, 1 - x]
            ys += [torch.from_numpy(labels)] * 2
        torch.manual_seed(0)
        train_and_save(MnistFeatures(), torch.cat(xs), torch.cat(ys), path)
    return torch.jit.load(path).eval()


@torch.no_grad()
def sample(pipe, prompt_list, per_prompt, seed=1000):
    """float NCHW [0, 1] samples, `per_prompt` of each prompt, sample i of a prompt with seed + i."""
    out = []
    for prompt in prompt_list:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(per_prompt)]
        images = pipe([prompt] * per_prompt, height=16, width=16, guidance_scale=3.0, num_inference_steps=20,
                      generator=generators, output_type="np").images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
    return torch.cat(out)


@torch.no_grad()
def fid(net, a, b):
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Module):
        def forward(self, x):
            return net(x.float() / 255 if x.dtype == torch.uint8 else x)

    metric = FrechetInceptionDistance(feature=Features(), normalize=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


@torch.no_grad()
def evaluate(pipe, net, names, held_x, train_x):
    target = sample(pipe, prompts(TARGET_CLASSES, names), SAMPLES_PER_PROMPT)
    source = sample(pipe, prompts(SOURCE_CLASSES, names), SAMPLES_PER_PROMPT)
    wanted_t = torch.tensor(TARGET_CLASSES).repeat_interleave(SAMPLES_PER_PROMPT)
    wanted_s = torch.tensor(SOURCE_CLASSES).repeat_interleave(SAMPLES_PER_PROMPT)
    result = {"target_accuracy": float((net.head(net(target)).argmax(1) == wanted_t).float().mean()),
              "source_accuracy": float((net.head(net(source)).argmax(1) == wanted_s).float().mean()),
              "target_fid": fid(net, held_x, target)}
    if train_x is not None:
        feats = [net(x) for x in (target, train_x, held_x[: len(train_x)])]
        result["memorisation"] = float((torch.cdist(feats[0], feats[1]).min(1).values
                                        < torch.cdist(feats[0], feats[2]).min(1).values).float().mean())
    return result


def run_arm(work, source, data, bank, arm, seed, steps):
    import train_diff_tuning_text_to_image as script
    from fixtures.in_process import run_script

    out = os.path.join(work, "runs", f"{os.path.basename(data)}_{arm}_seed{seed}")
    if not os.path.exists(os.path.join(out, "README.md")):
        run_script(script, ["--pretrained_model_name_or_path", source, "--dataset", data, "--output_dir", out,
                            *ARMS[arm], "--tuning", "lora", "--rank", "16", "--resolution", "16",
                            "--proportion_empty_prompts", "0.1",
                            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", str(seed),
                            *(["--train_batch_size", "8"] if "--train_batch_size" not in ARMS[arm] else []),
                            "--memory_bank", bank, "--memory_bank_prompts", os.path.join(work, "source_prompts.txt"),
                            "--memory_bank_size", "400", "--num_class_images", "400",
                            "--memory_bank_batch_size", "50", "--memory_bank_inference_steps", "20",
                            "--memory_bank_guidance_scale", "3", "--validation_steps", "0",
                            "--validation_inference_steps", "20", "--validation_guidance_scale", "3",
                            "--num_validation_images", "4", "--checkpointing_steps", "300",
                            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
                            "--report_to", "none", "--skip_image_check"])
    return out


def relative(a, b):
    return [(x - y) / y for x, y in zip(a, b)]


def reading(results, targets, seeds):
    report = {}
    for target in targets:
        r = {arm: [results[f"{target}/{arm}/{s}"] for s in seeds] for arm in ARMS}
        for arm in ("dt_paper", "dt_official"):
            for baseline in ("standard", "prior_pres"):
                fid_rel = relative([x["target_fid"] for x in r[arm]], [x["target_fid"] for x in r[baseline]])
                src = [x["source_accuracy"] - y["source_accuracy"] for x, y in zip(r[arm], r[baseline])]
                m, lo, hi = t_interval(fid_rel)
                ms, los, his = t_interval(src)
                if m <= -0.05 and hi < 0 and not his < 0:
                    word = "reproduced"
                elif lo > 0:
                    word = "contradicted"
                else:
                    word = "not reproduced (inconclusive)"
                report[f"{target}: {arm} vs {baseline}"] = {
                    "target_fid_relative": [m, lo, hi], "source_accuracy_difference": [ms, los, his],
                    "reading": word}
    return report


def plot(results, targets, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("target_fid", "target_accuracy", "source_accuracy"),
                              ("target FID (lower is better)", "target accuracy", "source accuracy (forgetting)")):
        for i, target in enumerate(targets):
            for j, arm in enumerate(ARMS):
                values = [results[f"{target}/{arm}/{s}"][key] for s in seeds]
                x = i * (len(ARMS) + 1) + j
                ax.bar(x, np.mean(values), color=f"C{j}", label=arm if i == 0 else None)
                ax.scatter([x] * len(values), values, color="k", s=8, zorder=3)
        ax.set_xticks([i * (len(ARMS) + 1) + 1.5 for i in range(len(targets))], targets)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default=os.path.join("benchmarks_out", "text_to_image_v3"))
    p.add_argument("--source_steps", type=int, default=4000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="A10, one seed, 100 steps, 300 source steps: runs, not read.")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from fixtures.offline_data import DIGIT_NAMES as names
    from utils.families.stable_diffusion import StableDiffusion

    work = a.work_dir + ("_quick" if a.quick else "")
    os.makedirs(work, exist_ok=True)
    started = time.time()
    seeds, steps = ([1], 100) if a.quick else (SEEDS, a.steps)
    source = build_source(work, 300 if a.quick else a.source_steps)
    with open(os.path.join(work, "source_prompts.txt"), "w") as f:
        f.write("\n".join(prompts(SOURCE_CLASSES, names)) + "\n")
    folders, held_x, held_y = write_targets(os.path.join(work, "data"))
    net = classifier(os.path.join(work, "digits_classifier.pt"))
    results_path = os.path.join(work, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def record(key, value):
        results[key] = value
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)

    def load(path):
        pipe = StableDiffusion.load(path)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    if "source" not in results:
        record("source", evaluate(load(source), net, names, held_x, None))
    premise = {"a_source_accuracy": results["source"]["source_accuracy"],
               "b_classifier_on_held_out_target": float((net.head(net(held_x)).argmax(1) == held_y).float().mean())}
    print(f"premise (a) {premise['a_source_accuracy']:.3f} >= 0.80, (b) "
          f"{premise['b_classifier_on_held_out_target']:.3f} >= 0.90 ({time.time() - started:.0f} s)", flush=True)
    bank = os.path.join(work, "memory_bank")
    targets = ["A10"] if a.quick else ["A100", "A10"]  # A100 first: premise (c) needs it
    for target in targets:
        train_x = torch.stack([torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                               / 255 for img in __import__("datasets").load_dataset(folders[target])["train"]["image"]])
        for seed in seeds:
            for arm in ARMS:
                key = f"{target}/{arm}/{seed}"
                if key in results:
                    continue
                out = run_arm(work, source, folders[target], bank, arm, seed, steps)
                pipe = load(source)
                pipe.load_lora_weights(out)
                record(key, evaluate(pipe, net, names, held_x, train_x if target == "A10" else None))
                print(f"{key}: {results[key]} ({time.time() - started:.0f} s)", flush=True)
    if not a.quick:
        premise["c_standard_A100_target_accuracy"] = float(np.mean(
            [results[f"A100/standard/{s}"]["target_accuracy"] for s in seeds]))
    premise["holds"] = (premise["a_source_accuracy"] >= 0.8 and premise["b_classifier_on_held_out_target"] >= 0.9
                        and premise.get("c_standard_A100_target_accuracy", 1.0) >= 0.5)
    report = {"premise": premise, "reading": reading(results, targets, seeds) if premise["holds"] else
              "premise failed: nothing is read", "seconds": time.time() - started}
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(results, targets, seeds, os.path.join(work, "text_to_image.png"))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
