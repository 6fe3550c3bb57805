"""Does `train_diff_tuning_text_to_image.py --method standard` train what diffusers' `train_text_to_image_lora.py`
trains, and `--with_prior_preservation` what `train_dreambooth_lora.py` trains, at the same flags and seed? Side
by side on a tiny Stable Diffusion built from configs.

    python -m benchmarks.diffusers_parity --examples_dir <diffusers checkout>/examples [--seeds 3 --steps 200]
        [--which text_to_image dreambooth sdxl]

SDXL (added 2026-12-03, design committed before its run): `train_text_to_image_lora_sdxl.py` beside ours on a tiny
SDXL, the text-to-image design and rule above otherwise unchanged (its size ids from the crop taken).

DreamBooth (added 2026-12-03, design committed before its run): 8 images of the digit 3 with the instance prompt
"a photo of sks digit", prior preservation with class prompt "a photo of a digit", 8 class images that the example
generates into its class folder, which ours then reads as DreamBooth's plain `--class_data_dir` (so both train on the
same class images), batch 2 (+ 2 class rows), lr 1e-3, `--center_crop`, `--steps` steps. Read by two held-out
losses: on 8 other 3s with the instance prompt (the subject learned) and on the class images with the class prompt
(the prior kept); the rule below applied to each, with the improvement measured on the first.

Design, written before the first run:
- Both scripts train LoRA (rank 4, the UNet's to_q/k/v/out.0) on the same 64 captioned digits at 16 px, batch 4,
  lr 1e-3 constant, no warm-up, weight decay 1e-2, `--center_crop`, no flips, `--steps` steps, seed s. The example
  runs as it is (read from `--examples_dir`, never copied here) through `benchmarks/run_diffusers_example.py`,
  which puts `benchmarks/torchvision_stand_in` on its path,
  since torchvision does not import beside our pinned torch; the stand-in applies torchvision's rules
  (utils.infra.image_transforms, tested against them) and torch's global generator, as torchvision does.
- The two scripts draw their random numbers in different orders (the example: torch's global generator, ours: one
  generator per step), so their weights cannot be compared bit for bit. What is compared is what a user cares
  about: the held-out denoising loss of each final LoRA, loaded with `load_lora_weights` into the stock pipeline,
  on 64 other digits with fixed noise and timesteps (the same for every model), beside the base model's.
- Premise: both runs improve on the base model by more than the seed-to-seed spread (else the comparison says
  nothing).
- Seeds: 0..S-1 (S = 3 by default, the budget of one CPU session), paired by seed.
- Rule: "same training" if the paired difference (ours - example) has a 95% t-interval that contains 0 and whose
  half-width plus |mean| is under 10% of the example's mean improvement over the base; "differs" if the interval
  excludes 0; "inconclusive" otherwise.
Results: benchmarks/RESULTS.md ("diffusers parity").
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMMON = ["--resolution", "16", "--train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler", "constant",
          "--lr_warmup_steps", "0", "--adam_weight_decay", "1e-2", "--center_crop", "--rank", "4",
          "--checkpointing_steps", "100000", "--report_to", "tensorboard", "--dataloader_num_workers", "0"]


INSTANCE, CLASS = "a photo of sks digit", "a photo of a digit"


def fixtures(folder):
    from PIL import Image

    from fixtures.offline_data import sklearn_digits, write_captioned_folder
    from fixtures.small_unet import build_sd_pipeline, build_sdxl_pipeline

    paths = {k: os.path.join(folder, k) for k in ("sd", "sdxl", "train", "held_out", "instance", "instance_held_out")}
    if not os.path.exists(os.path.join(paths["sdxl"], "model_index.json")):
        build_sdxl_pipeline(os.path.join(folder, "sdxl_src")).save_pretrained(paths["sdxl"])
    if not os.path.exists(os.path.join(paths["instance_held_out"], "7.png")):
        build_sd_pipeline(os.path.join(folder, "sd_src")).save_pretrained(paths["sd"])
        images, labels, names = sklearn_digits()
        write_captioned_folder(images, labels, names, paths["train"], 64)
        write_captioned_folder(images[64:], labels[64:], names, paths["held_out"], 64)
        threes = [img for img, label in zip(images, labels) if label == 3]
        for key, chunk in (("instance", threes[:8]), ("instance_held_out", threes[8:16])):
            os.makedirs(paths[key])
            for i, img in enumerate(chunk):  # a plain folder of images, as DreamBooth takes
                Image.fromarray(img).convert("RGB").resize((16, 16), Image.NEAREST).save(
                    os.path.join(paths[key], f"{i}.png"))
    return paths


def run(cmd, log, env=None):
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})


def held_out_loss(sd_dir, lora_dir, data_dir, seed=1234, prompt: str | None = None) -> float:
    """Mean epsilon MSE of the pipeline (with the LoRA, if any) on the held-out images (their captions, or one
    `prompt` for all), fixed noise and t."""
    import torch
    from diffusers import DDPMScheduler

    from utils.families.registry import TEXT_TO_IMAGE, detect_family
    from utils.infra.data import load_image_dataset

    family_class = detect_family(sd_dir, TEXT_TO_IMAGE, "the parity check")
    pipe = family_class.load(sd_dir)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    family = family_class.from_pipeline(pipe, "cpu")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ds = load_image_dataset(data_dir)
    if prompt is not None:
        ds = ds.add_column("prompt", [prompt] * len(ds))
    ds = ds.with_transform(family.transform("image", "prompt" if prompt is not None else "text", 16))
    batch = family.collate([ds[i] for i in range(len(ds))])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = family.rows(batch, g)
        x0 = family.x0(rows.x, g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = family.predict(pipe.unet, noisy, t, family.encode(rows.cond))
    return float((pred - noise).pow(2).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples_dir", required=True, help="diffusers' examples/ folder (a checkout of diffusers).")
    p.add_argument("--output_dir", default="parity_out")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--which", nargs="+", choices=("text_to_image", "dreambooth", "sdxl"), default=["text_to_image"])
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.examples_dir, "text_to_image", "train_text_to_image_lora.py")):
        sys.exit(f"error: {a.examples_dir} has no text_to_image/train_text_to_image_lora.py; --examples_dir is "
                 "diffusers' examples/ folder")
    paths = fixtures(os.path.join(a.output_dir, "fixtures"))
    report = {}
    runner = os.path.join(ROOT, "benchmarks", "run_diffusers_example.py")
    for which in a.which:
        seeds = {}
        for seed in range(a.seeds):
            outs = {k: os.path.join(a.output_dir, which, f"{k}_{seed}") for k in ("example", "ours")}
            flags = [*COMMON, "--max_train_steps", str(a.steps), "--seed", str(seed),
                     "--pretrained_model_name_or_path", paths["sd"]]
            if which in ("text_to_image", "sdxl"):
                model = paths["sdxl" if which == "sdxl" else "sd"]
                flags[flags.index("--pretrained_model_name_or_path") + 1] = model
                name = "train_text_to_image_lora_sdxl.py" if which == "sdxl" else "train_text_to_image_lora.py"
                example_argv = [os.path.join(a.examples_dir, "text_to_image", name), *flags, "--train_data_dir",
                                paths["train"], "--caption_column", "text"]
                ours_argv = [*flags, "--dataset", paths["train"], "--method", "standard"]
            else:
                class_dir = os.path.join(a.output_dir, which, f"class_images_{seed}")  # the example writes it
                dreambooth = [*flags[:flags.index("--train_batch_size") + 1], "2",
                              *flags[flags.index("--train_batch_size") + 2:], "--instance_data_dir", paths["instance"],
                              "--instance_prompt", INSTANCE, "--with_prior_preservation", "--class_prompt", CLASS,
                              "--num_class_images", "8", "--class_data_dir", class_dir]
                example_argv = [os.path.join(a.examples_dir, "dreambooth", "train_dreambooth_lora.py"), *dreambooth]
                ours_argv = dreambooth
            if not os.path.exists(os.path.join(outs["example"], "pytorch_lora_weights.safetensors")):
                run([sys.executable, runner, *example_argv, "--output_dir", outs["example"]], outs["example"] + ".log")
            if not os.path.exists(os.path.join(outs["ours"], "pytorch_lora_weights.safetensors")):
                run([sys.executable, "train_diff_tuning_text_to_image.py", *ours_argv, "--validation_steps", "0",
                     "--num_validation_images", "1", "--validation_inference_steps", "2", "--output_dir",
                     outs["ours"]], outs["ours"] + ".log")
            if which in ("text_to_image", "sdxl"):
                reads = {"held-out MSE": (paths["held_out"], None)}
            else:
                reads = {"instance MSE": (paths["instance_held_out"], INSTANCE), "prior MSE": (class_dir, CLASS)}
            model = paths["sdxl" if which == "sdxl" else "sd"]
            seeds[seed] = {read: {k: held_out_loss(model, v, data, prompt=prompt)
                                  for k, v in {"base": None, **outs}.items()}
                           for read, (data, prompt) in reads.items()}
            print(which, seed, seeds[seed], flush=True)
        first = next(iter(reads))  # the read whose improvement scales the rule (the prior is meant to stay)
        gain = float(np.mean([s[first]["base"] - s[first]["example"] for s in seeds.values()]))
        report[which] = {"seeds": seeds, **{read: verdict([s[read] for s in seeds.values()], gain, read == first)
                                            for read in reads}}
    print(json.dumps(report, indent=2))
    with open(os.path.join(a.output_dir, "parity.json"), "w") as f:
        json.dump(report, f, indent=2)


def verdict(rows: list[dict], improvement: float, premise: bool = True) -> dict:
    """The rule of the docstring on paired (ours, example) losses (`improvement`: the example's mean gain over the
    base that scales it; `premise`: whether both runs must improve on the base in this read)."""
    from scipy import stats

    diffs = np.array([r["ours"] - r["example"] for r in rows])
    half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))) \
        if len(diffs) > 1 else float("inf")
    mean = float(diffs.mean())
    if premise and not all(r["base"] - r[k] > 0 for r in rows for k in ("ours", "example")):
        rule = "premise failed: a run did not improve on the base model"
    elif abs(mean) > half:
        rule = "differs"
    elif abs(mean) + half < 0.1 * improvement:
        rule = "same training"
    else:
        rule = "inconclusive"
    return {"mean difference (ours - example)": mean, "95% half-width": half,
            "example's mean improvement over base": improvement, "verdict": rule}


if __name__ == "__main__":
    main()
