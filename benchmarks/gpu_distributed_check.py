"""Do the DiT, ControlNet and text-to-image (SD, SDXL, SD3) scripts train, checkpoint, resume and save the same
model under accelerate's FSDP and DeepSpeed ZeRO-2 as without them? A check for a machine with CUDA GPUs (a few
minutes on one), on tiny pipelines built from configs (nothing is downloaded).

    python -m benchmarks.gpu_distributed_check [--output_dir gpu_check] [--num_processes N] [--only dit sd3 ...]

`--cpu_wiring` runs the plain engine on CPU with one process (what tests/test_bench_gpu_check.py does, on two
scripts): it checks this file's fixtures and flags, not the engines.

Why a GPU script: accelerate 1.x turns on its FSDP and DeepSpeed plugins only over accelerators. On CPU with gloo
an FSDP config either runs plain data parallel (`ACCELERATE_USE_FSDP` beside `ACCELERATE_USE_CPU`) or, with
`use_cpu: true` in the config file, starts N processes that each set up a world of one; the scripts refuse the
latter in one line (`utils.infra.training.make_accelerator`). Data parallel on CPU is tested in tests/.

For each script (train_diff_tuning_dit.py, train_diff_tuning_controlnet.py, train_diff_tuning_text_to_image.py with
LoRA on SD, SDXL and SD3, and full tuning on SD) and engine (none: plain data
parallel; fsdp: FSDP2, FULL_STATE_DICT; deepspeed: ZeRO-2, when deepspeed imports), three runs of 4 optimizer steps
with a checkpoint every 2: (1) uninterrupted; (2) stopped after step 2 (`--max_train_steps 2`) and (3) resumed from
its checkpoint to step 4 (constant lr, so the schedule is the same). Recorded in report.json and printed:
- ok: every run exits 0 and saves a model that loads in the stock class with finite weights;
- engine vs none: the largest absolute difference of the final weights (GPU kernels differ between engines, so
  this is a tolerance, 1e-3 relative to the largest weight, not equality);
- resume: the largest absolute difference between the resumed and the uninterrupted run under the same engine
  (expected 0 with deterministic kernels; reported, whatever it is).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ENGINES = {
    "none": "distributed_type: {multi}\n",
    "fsdp": ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: NO_WRAP\n"
             "  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_reshard_after_forward: true\n"
             "  fsdp_cpu_ram_efficient_loading: false\n"),
    "deepspeed": ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: none\n"
                  "  offload_param_device: none\n  gradient_accumulation_steps: 1\n  gradient_clipping: 1.0\n"),
}


def config_file(folder, engine, processes, cpu=False):
    path = os.path.join(folder, f"{engine}.yaml")
    with open(path, "w") as f:
        f.write("compute_environment: LOCAL_MACHINE\n" + ENGINES[engine].format(
            multi="MULTI_GPU" if processes > 1 else "'NO'")
                + f"mixed_precision: 'no'\nnum_machines: 1\nnum_processes: {processes}\n"
                + f"use_cpu: {'true' if cpu else 'false'}\n")
    return path


def fixtures(folder):
    from fixtures.offline_data import sklearn_digits, write_captioned_folder, write_control_folder, write_image_folder
    from fixtures.small_dit import build_pipeline
    from fixtures.small_unet import build_sd3_pipeline, build_sd_pipeline, build_sdxl_pipeline
    from utils.metrics.annotators import make_annotator

    paths = {k: os.path.join(folder, k) for k in ("dit", "sd", "sdxl", "sd3", "digits", "control", "captioned")}
    if not os.path.exists(os.path.join(paths["captioned"], "metadata.jsonl")):
        build_pipeline().save_pretrained(paths["dit"])
        build_sd_pipeline(os.path.join(folder, "sd_src")).save_pretrained(paths["sd"])
        build_sdxl_pipeline(os.path.join(folder, "sdxl_src")).save_pretrained(paths["sdxl"])
        build_sd3_pipeline(os.path.join(folder, "sd3_src")).save_pretrained(paths["sd3"])
        write_image_folder(*sklearn_digits(), paths["digits"], limit=160)
        write_control_folder(*sklearn_digits(), paths["control"], make_annotator("canny"), limit=48)
        write_captioned_folder(*sklearn_digits(), paths["captioned"], 64)
    return paths


TEXT_TO_IMAGE = ["--resolution", "16", "--train_batch_size", "4", "--memory_bank_size", "8",
                 "--memory_bank_batch_size", "4", "--memory_bank_inference_steps", "2", "--validation_inference_steps",
                 "2", "--num_validation_images", "2", "--validation_steps", "0", "--learning_rate", "1e-3",
                 "--lr_warmup_steps", "0", "--train_text_encoder"]
SCRIPTS = {
    "dit": ("train_diff_tuning_dit.py", "dit", "digits",
            ["--resolution", "8", "--train_batch_size", "8", "--memory_bank_size", "16", "--memory_bank_batch_size",
             "8", "--memory_bank_inference_steps", "4", "--validation_steps", "0", "--learning_rate", "1e-3"],
            "transformer/diffusion_pytorch_model.safetensors"),
    "controlnet": ("train_diff_tuning_controlnet.py", "sd", "control",
                   ["--resolution", "16", "--train_batch_size", "4", "--memory_bank_size", "8",
                    "--memory_bank_batch_size", "4", "--memory_bank_inference_steps", "2",
                    "--validation_inference_steps", "2", "--num_validation_samples", "4", "--num_validation_images",
                    "4", "--validation_steps", "0", "--learning_rate", "1e-3", "--convergence_threshold", "0.99",
                    "--lr_warmup_steps", "0"],
                   "diffusion_pytorch_model.safetensors"),
    **{f"t2i_{family}": ("train_diff_tuning_text_to_image.py", family, "captioned",
                         [*TEXT_TO_IMAGE, *(["--max_sequence_length", "16"] if family == "sd3" else [])],
                         "pytorch_lora_weights.safetensors") for family in ("sd", "sdxl", "sd3")},
    "t2i_sd_full": ("train_diff_tuning_text_to_image.py", "sd", "captioned",
                    [*(f for f in TEXT_TO_IMAGE if f != "--train_text_encoder"), "--tuning", "full"],
                    "unet/diffusion_pytorch_model.safetensors"),
}


def launch(config, script, argv, log):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, script, *argv,
           "--report_to", "none", "--checkpointing_steps", "2"]
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}).returncode


def max_difference(a, b):
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    scale = max(float(x[k].float().abs().max()) for k in x)
    return diff, scale


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=os.environ.get("OUT", "gpu_check"))
    p.add_argument("--num_processes", type=int, default=None, help="Default: every visible GPU.")
    p.add_argument("--only", nargs="+", choices=tuple(SCRIPTS), default=None, help="Check only these runs.")
    p.add_argument("--cpu_wiring", action="store_true",
                   help="The plain engine on CPU, one process: checks the fixtures and flags, not the engines.")
    a = p.parse_args()
    import importlib.util

    import torch

    if not torch.cuda.is_available() and not a.cpu_wiring:
        sys.exit("error: no CUDA GPU; this check is for a GPU machine (see the docstring for what CPU allows)")
    processes = 1 if a.cpu_wiring else a.num_processes or torch.cuda.device_count()
    os.makedirs(a.output_dir, exist_ok=True)
    paths = fixtures(os.path.join(a.output_dir, "fixtures"))
    report = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "processes": processes, "torch": torch.__version__, "runs": {}}
    engines = [e for e in ENGINES if e != "deepspeed" or importlib.util.find_spec("deepspeed")]
    if "deepspeed" not in engines:
        report["deepspeed"] = "not installed: not checked"
    if a.cpu_wiring:
        engines = ["none"]
    for name, (script, model, data, flags, weights) in SCRIPTS.items():
        if a.only and name not in a.only:
            continue
        for engine in engines:
            config = config_file(a.output_dir, engine, processes, cpu=a.cpu_wiring)
            base = ["--pretrained_model_name_or_path", paths[model], "--dataset", paths[data], *flags]
            out = {kind: os.path.join(a.output_dir, "runs", name, engine, kind) for kind in ("full", "resumed")}
            rc = [launch(config, script, [*base, "--output_dir", out["full"], "--max_train_steps", "4"],
                         out["full"] + ".log"),
                  launch(config, script, [*base, "--output_dir", out["resumed"], "--max_train_steps", "2"],
                         out["resumed"] + ".1.log"),
                  launch(config, script, [*base, "--output_dir", out["resumed"], "--max_train_steps", "4",
                                          "--resume_from_checkpoint", "latest"], out["resumed"] + ".2.log")]
            entry = {"exit codes": rc, "ok": rc == [0, 0, 0]}
            if entry["ok"]:
                entry["resume max |diff|"] = max_difference(os.path.join(out["full"], weights),
                                                            os.path.join(out["resumed"], weights))[0]
                if engine != "none":
                    diff, scale = max_difference(os.path.join(out["full"], weights),
                                                 os.path.join(a.output_dir, "runs", name, "none", "full", weights))
                    entry["vs none max |diff|"] = diff
                    entry["vs none within 1e-3 relative"] = diff <= 1e-3 * scale
            report["runs"][f"{name}/{engine}"] = entry
            print(f"{name} {engine}: {entry}", flush=True)
    with open(os.path.join(a.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
