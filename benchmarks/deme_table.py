"""DeMe at small scale on CPU, in the spirit of DeMe's Table 1: pre-trained -> continued fine-tuning -> DeMe
(ensemble, merged with uniform weights, merged with searched weights), FID on the same data.

    python -m benchmarks.deme_table [--work_dir benchmarks_out/deme] [--pretrain_steps 5000] [--steps 300]

1. Pre-train a small pixel-space DDPM UNet (16 px, channels 16/32, random init) on MNIST-5k with plain
   denoising (`train_deme.py --num_ranges 1 --global_sample_prob 1 --consistency_weight 0 --channel_projection
   none`, which is ordinary fine-tuning over all timesteps). As in the paper, everything after it trains on the
   pre-training data itself.
2. Continued fine-tuning: the same plain training for `--steps` more steps, and for 4 x `--steps` (DeMe's total).
3. DeMe: N = 4 ranges, `--steps` each (paper defaults: p = 0.3, consistency 1.0, foldable projections), then
   `merge_timestep_models.py` with w_i = 1/N, with weights found by coordinate search on the held-out loss, and
   as a timestep-wise ensemble.
4. FID of 500 samples (DDIM 50 steps) against MNIST-5k, with the MNIST-CNN features of `benchmarks.transfer`.

Writes `<work_dir>/results.json` and `benchmarks/deme_table.md`.
"""

import argparse
import json
import os
import shutil
import time

import evaluate_fid
import merge_timestep_models
import train_deme
from benchmarks.transfer import feature_extractor
from fixtures.in_process import run_script
from fixtures.offline_data import mnist_5k, write_image_folder
from fixtures.small_unet import build_ddpm_pipeline

PLAIN = ["--num_ranges", "1", "--global_sample_prob", "1", "--consistency_weight", "0",
         "--channel_projection", "none"]


def train(pipeline, data, out, steps, *extra):
    if os.path.exists(os.path.join(out, "deme_manifest.json")) and all(
            os.path.exists(os.path.join(out, d, "README.md")) for d in os.listdir(out) if d.startswith("range_")):
        return
    run_script(train_deme, [
        "--pretrained_model_name_or_path", pipeline, "--dataset", data, "--output_dir", out, "--no-random_flip",
        "--train_batch_size", "64", "--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
        "--validation_steps", "0", "--report_to", "none", "--num_validation_images", "8",
        "--validation_inference_steps", "25", "--seed", "0", *extra])


def as_pipeline(base_pipeline, unet_folder, out):
    """`base_pipeline` with the UNet of `unet_folder`."""
    if not os.path.exists(out):
        shutil.copytree(base_pipeline, out, ignore=shutil.ignore_patterns("unet"))
        shutil.copytree(unet_folder, os.path.join(out, "unet"),
                        ignore=shutil.ignore_patterns("checkpoint-*", "logs", "*.png", "README.md", "*.json.tmp"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="benchmarks_out/deme", help="Models, data and reports (not committed).")
    p.add_argument("--pretrain_steps", type=int, default=5000, help="Pre-training steps (batch 64, lr 1e-3).")
    p.add_argument("--steps", type=int, default=300, help="Continued fine-tuning steps, and DeMe steps per range.")
    p.add_argument("--fid_samples", type=int, default=500, help="Samples per FID.")
    a = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    w = os.path.abspath(a.work_dir)
    os.makedirs(w, exist_ok=True)
    data = os.path.join(w, "mnist")
    if not os.path.isdir(data):
        write_image_folder(*mnist_5k(), data + ".tmp")
        os.replace(data + ".tmp", data)
    extractor = feature_extractor(os.path.join(w, "mnist_features.pt"))
    init = os.path.join(w, "init")
    if not os.path.exists(init):
        build_ddpm_pipeline(resolution=16, channels=(16, 32)).save_pretrained(init)

    train(init, data, os.path.join(w, "pretrain"), a.pretrain_steps, *PLAIN, "--learning_rate", "1e-3",
          "--lr_scheduler", "cosine", "--lr_warmup_steps", "100")
    pretrained = as_pipeline(init, os.path.join(w, "pretrain", "range_0"), os.path.join(w, "pretrained"))
    train(pretrained, data, os.path.join(w, "continued"), a.steps, *PLAIN, "--learning_rate", "2e-4")
    # DeMe trains 4 models of `--steps` each; continued fine-tuning gets the same steps once and the same total.
    train(pretrained, data, os.path.join(w, "continued_4x"), 4 * a.steps, *PLAIN, "--learning_rate", "2e-4")
    train(pretrained, data, os.path.join(w, "deme"), a.steps, "--num_ranges", "4", "--learning_rate", "2e-4")
    merge = merge_timestep_models.main
    models = ["--base_model", pretrained, "--models", os.path.join(w, "deme")]
    if not os.path.exists(os.path.join(w, "merged_uniform")):
        merge(merge_timestep_models.parse_args([*models, "--output_dir", os.path.join(w, "merged_uniform")]))
    if not os.path.exists(os.path.join(w, "merged_searched")):
        merge(merge_timestep_models.parse_args([
            *models, "--output_dir", os.path.join(w, "merged_searched"), "--search", "coordinate",
            "--grid_values", "0", "0.5", "1", "--search_rounds", "1", "--validation_dataset", data,
            "--validation_batches", "2", "--validation_batch_size", "64"]))
    if not os.path.exists(os.path.join(w, "ensemble")):
        merge(merge_timestep_models.parse_args([*models, "--output_dir", os.path.join(w, "ensemble"), "--ensemble"]))
    searched = json.load(open(os.path.join(w, "merged_searched", "search_results.json")))[0]["weights"]

    rows = {
        "pre-trained": pretrained,
        f"continued fine-tuning (+{a.steps} steps)": as_pipeline(init, os.path.join(w, "continued", "range_0"),
                                                                 os.path.join(w, "continued_pipeline")),
        f"continued fine-tuning (+{4 * a.steps} steps, DeMe's total)": as_pipeline(
            init, os.path.join(w, "continued_4x", "range_0"), os.path.join(w, "continued_4x_pipeline")),
        "DeMe before merge (timestep-wise ensemble of 4)": os.path.join(w, "ensemble"),
        "DeMe merged, w_i = 1/4": os.path.join(w, "merged_uniform"),
        f"DeMe merged, searched w = {searched}": os.path.join(w, "merged_searched"),
    }
    results = {}
    for name, model in rows.items():
        report = evaluate_fid.main(evaluate_fid.parse_args([
            "--model", model, "--scheduler_model", pretrained, "--dataset", data, "--feature_extractor", extractor,
            "--num_samples", str(a.fid_samples), "--batch_size", "200",
            "--reference_cache_dir", os.path.join(w, "fid_cache"),
            "--output_file", os.path.join(w, name.split(" ")[0].replace("-", "_") + f"_{len(results)}.json")]))
        results[name] = report["results"][0]["fid"]
    json.dump(results, open(os.path.join(w, "results.json"), "w"), indent=2)
    lines = [f"| model | FID (MNIST-CNN features, {a.fid_samples} samples vs MNIST-5k) |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in results.items()]
    lines.append(f"\nWall time of this invocation (finished stages in work_dir are not redone): "
                 f"{(time.time() - start) / 60:.1f} min.")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "deme_table.md"), "w") as f:
        f.write(f"Command: `python -m benchmarks.deme_table --pretrain_steps {a.pretrain_steps} --steps {a.steps}`"
                f"\n\n{table}\n")


if __name__ == "__main__":
    main()
