import glob
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DiTPipeline
from diffusers.training_utils import EMAModel
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import train_diff_tuning_dit as script
from fixtures.in_process import run_script
from fixtures.testing import (
    ROOT,
    TINY_ARGS,
    cli_help,
    killed_at_first_checkpoint,
    run_module,
    train_dit,
    transformer_weights,
)
from utils.infra import training
from utils.infra.checkpointing import resume
from utils.infra.errors import UserError

train = train_dit


@pytest.mark.cli
def test_end_to_end_with_accelerate_launch(tiny_pipeline_dir, digits_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train_diff_tuning_dit.py",
         "--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir, "--output_dir", str(out),
         *TINY_ARGS, "--max_train_steps", "4", "--validation_steps", "2", "--checkpointing_steps", "2",
         "--report_to", "tensorboard", "--num_validation_images", "10"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The memory bank was generated from the pre-trained model and stored as a datasets dataset.
    bank = datasets.load_from_disk(str(out / "memory_bank"))
    assert len(bank) == 16 and {"image", "class_label", "seed", "latent_moments"} <= set(bank.column_names)
    assert np.array(bank[0]["latent_moments"]).shape == (8, 4, 4)

    # The transformer trained; the frozen VAE did not change by a bit.
    before, after = transformer_weights(tiny_pipeline_dir), transformer_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    vae_before = load_file(os.path.join(tiny_pipeline_dir, "vae", "diffusion_pytorch_model.safetensors"))
    vae_after = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)

    # A stock DiTPipeline loads it, knows the downstream class names, and samples with guidance.
    pipe = DiTPipeline.from_pretrained(out)
    names = datasets.load_dataset("imagefolder", data_dir=digits_dir)["train"].features["label"].names
    assert pipe.labels == {name: i for i, name in enumerate(names)} and len(names) == 10
    images = pipe(class_labels=pipe.get_label_ids(["three", "seven"]), guidance_scale=4.0, num_inference_steps=3,
                  output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model is None
    assert "diff-tuning" in card.data.tags and "DiTPipeline.from_pretrained" in card.text
    assert Image.open(out / "samples.png").size == (8 * 64, 2 * 64)  # 10 samples on 8 x 2, upscaled to be seen
    assert sorted(os.listdir(out / "checkpoint-4")) != []

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "diff-tuning-dit"), size_guidance={"images": 0}).Reload()
    assert "validation" in events.Tags()["images"] and "loss_retain" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("accumulation,ema", [(1, False), (2, True)])
def test_resume_matches_uninterrupted_run(tiny_pipeline_dir, digits_dir, tiny_bank_dir, tmp_path, monkeypatch,
                                          accumulation, ema):
    common = ["--memory_bank", tiny_bank_dir, "--max_train_steps", "6", "--checkpointing_steps", "3",
              "--gradient_accumulation_steps", str(accumulation), "--lr_scheduler", "cosine"]
    common += ["--use_ema", "--ema_decay", "0.5"] if ema else []
    train(tiny_pipeline_dir, digits_dir, tmp_path / "full", *common)

    # Crash right after the step-3 checkpoint is written, then resume from it.
    killed_at_first_checkpoint(monkeypatch, lambda: train(tiny_pipeline_dir, digits_dir, tmp_path / "resumed",
                                                          *common))
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    train(tiny_pipeline_dir, digits_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")

    full, resumed = transformer_weights(tmp_path / "full"), transformer_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    at_crash = load_file(str(tmp_path / "resumed" / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(at_crash[k], resumed[k]) for k in at_crash)  # it did train after resuming


def test_resume_puts_the_ema_back_on_the_training_device(tmp_path, monkeypatch):
    """accelerate loads registered custom states (the EMA) on the CPU; on a GPU the next EMA step would then mix
    devices, so resume() must move it back."""
    accelerator = Accelerator(cpu=True)
    ema = training.make_ema(torch.nn.Linear(2, 2), 0.5, accelerator)
    accelerator.save_state(str(tmp_path / "checkpoint-4"))
    moved = []
    monkeypatch.setattr(EMAModel, "to", lambda self, device=None, **kw: moved.append(device))
    assert resume(accelerator, str(tmp_path), "latest", logging.getLogger("test"), ema) == 4
    assert moved == [accelerator.device]


@pytest.mark.cli
def test_two_processes(tiny_pipeline_dir, digits_dir, tiny_bank_dir, tmp_path):
    """Data parallel on two CPU processes (gloo): both ranks end with identical weights; only rank 0 writes."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train_diff_tuning_dit as s\n"
        "model = s.main(s.parse_args(sys.argv[1:]))\n"
        f"torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(wrapper),
         "--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir, "--output_dir", str(out),
         *TINY_ARGS, "--max_train_steps", "3", "--checkpointing_steps", "2", "--report_to", "tensorboard",
         "--memory_bank_size", "24"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], v) for k, v in transformer_weights(tiny_pipeline_dir).items())
    # Both ranks generated bank shards (24 samples = 3 shards of 8), rank 0 alone assembled and wrote outputs.
    assert len(datasets.load_from_disk(str(out / "memory_bank"))) == 24
    written = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**"), recursive=True))
    assert "checkpoint-2/random_states_0.pkl" in written
    assert not [p for p in written if "random_states_1" in p or p.endswith(".partial") or p.endswith(".tmp")]
    assert len(glob.glob(str(out / "logs" / "**" / "events.out.tfevents*"), recursive=True)) == 2  # 1 writer
    assert len({os.path.basename(p).split(".")[-2] for p in glob.glob(
        str(out / "logs" / "**" / "events.out.tfevents*"), recursive=True)}) == 1  # from a single process id


def test_cached_latents_equal_encoding_every_step(tiny_pipeline_dir, digits_dir, tmp_path, monkeypatch):
    """--cache_latents feeds the model exactly the VAE posteriors (image or mirror) that encoding each step
    would, with the same random choices."""
    from utils.methods.diff_tuning import DiffTuning

    seen = {}
    original = DiffTuning.batch

    def recorder(self, *a, **kw):
        result = original(self, *a, **kw)
        seen.setdefault(run, []).append(result)
        return result

    monkeypatch.setattr(DiffTuning, "batch", recorder)
    for run in ("encode", "cached"):
        train(tiny_pipeline_dir, digits_dir, tmp_path / run, "--method", "standard", "--max_train_steps", "3",
              *(["--cache_latents"] if run == "cached" else []))
    assert len(seen["encode"]) == len(seen["cached"]) == 3
    for b1, b2 in zip(seen["encode"], seen["cached"]):
        torch.testing.assert_close(b1.x0, b2.x0, atol=1e-5, rtol=1e-5)
        assert torch.equal(b1.cond["class_labels"], b2.cond["class_labels"]) and torch.equal(b1.timesteps, b2.timesteps)
    cached, init = transformer_weights(tmp_path / "cached"), transformer_weights(tiny_pipeline_dir)
    assert any(not torch.allclose(cached[k], init[k], atol=1e-5) for k in init)


def test_training_lowers_the_denoising_loss(tiny_pipeline_dir, digits_dir, tmp_path):
    from diffusers import DDPMScheduler

    from utils.infra.data import to_tensor

    pipe = DiTPipeline.from_pretrained(tiny_pipeline_dir)
    files = sorted(glob.glob(os.path.join(digits_dir, "*", "*.png")))[:32]
    pixels = torch.stack([to_tensor(Image.open(f), 8) for f in files])
    labels = torch.tensor([["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
                           .index(os.path.basename(os.path.dirname(f))) for f in files])
    g = torch.Generator().manual_seed(0)
    x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (len(x0),), generator=g)
    xt = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(x0, noise, t)

    @torch.no_grad()
    def held_out_loss(model):
        return ((model(xt, timestep=t, class_labels=labels).sample[:, :4] - noise) ** 2).mean().item()

    model = train(tiny_pipeline_dir, digits_dir, tmp_path, "--method", "standard", "--max_train_steps", "40")
    assert held_out_loss(model.eval()) < 0.8 * held_out_loss(pipe.transformer)


def test_mixed_precision_ema_and_gradient_checkpointing(tiny_pipeline_dir, digits_dir, tiny_bank_dir, tmp_path):
    """bf16 autocast (CPU here, the same code path as on GPUs): trains, validates, saves an fp32 pipeline."""
    train(tiny_pipeline_dir, digits_dir, tmp_path, "--memory_bank", tiny_bank_dir, "--mixed_precision", "bf16",
          "--use_ema", "--ema_decay", "0.5", "--gradient_checkpointing", "--max_train_steps", "3",
          "--validation_steps", "2")
    weights = transformer_weights(tmp_path)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    init = transformer_weights(tiny_pipeline_dir)
    assert any(not torch.equal(weights[k], init[k]) for k in init)
    pipe = DiTPipeline.from_pretrained(tmp_path)
    assert pipe.vae.dtype == torch.float32 and np.isfinite(
        pipe(class_labels=[0], num_inference_steps=2, output_type="np").images).all()


def test_memory_bank_is_deterministic_and_resumable(tmp_path):
    from fixtures.small_dit import build_pipeline
    from utils.families.dit import DiTBankSampler
    from utils.methods.memory_bank import finalize, generate_shards

    pipe = build_pipeline()
    pipe.labels = {"a": 3, "b": 7}  # named classes: the bank draws only these
    generate_shards(DiTBankSampler(pipe, num_inference_steps=3), str(tmp_path / "a"), 10, batch_size=4, seed=5)
    finalize(str(tmp_path / "a"), 10, {})
    generate_shards(DiTBankSampler(pipe, num_inference_steps=3), str(tmp_path / "b"), 10, batch_size=5, seed=5)
    finalize(str(tmp_path / "b"), 10, {})
    a, b = datasets.load_from_disk(str(tmp_path / "a")), datasets.load_from_disk(str(tmp_path / "b"))
    assert a["seed"] == b["seed"] == list(range(5, 15)) and a["class_label"] == b["class_label"]
    assert set(a["class_label"]) <= {3, 7}
    np.testing.assert_allclose(np.array(a["latent_moments"]), np.array(b["latent_moments"]), atol=1e-5)

    # Interrupted: shard 1 missing. A rerun regenerates only shard 1 and yields the same bank.
    shards = tmp_path / "c.partial"
    generate_shards(DiTBankSampler(pipe, num_inference_steps=3), str(tmp_path / "c"), 10, batch_size=4, seed=5)
    shutil.rmtree(shards / "shard-000001")
    kept = os.path.getmtime(shards / "shard-000000")
    generate_shards(DiTBankSampler(pipe, num_inference_steps=3), str(tmp_path / "c"), 10, batch_size=4, seed=5)
    assert os.path.getmtime(shards / "shard-000000") == kept
    finalize(str(tmp_path / "c"), 10, {})
    c = datasets.load_from_disk(str(tmp_path / "c"))
    np.testing.assert_array_equal(np.array(a["latent_moments"]), np.array(c["latent_moments"]))
    assert not shards.exists()


# ---- Bad input: one clear line, before any expensive work, and nothing left behind that looks complete.

def _dataset_on_disk(path, **columns):
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def _nothing_written(out):
    return not os.path.exists(out) or not {"memory_bank", "model_index.json"} & set(os.listdir(out))


@pytest.mark.parametrize("case,message", [
    ("missing_path", "does not exist"),
    ("no_image_column", "no image column"),
    ("corrupt_image", "corrupt or unreadable image .*bad.png"),
    ("too_many_classes", "1001 classes but the model's label table has 1000 rows"),
    ("bank_of_another_dit", r"memory bank .*bank was made with base_model = '.*other'"),
    ("resolution", "--resolution 16 gives 8x latents but the model takes 4x"),
    ("missing_model", r"no_model does not exist \(no such folder"),
    ("not_a_dit", r"is a DDPMPipeline \(unet UNet2DModel\); train_diff_tuning_dit.py takes a class-conditional"),
    ("smaller_than_batch", "dataset has 3 images, fewer than one batch of 4"),
    ("difffit_blocks", r"--difffit_blocks must be in 1\.\.2 for this model, got 3"),
])
def test_bad_input_fails_before_training(case, message, tiny_pipeline_dir, tiny_ddpm_dir, digits_dir, tmp_path):
    data, extra = digits_dir, []
    if case == "missing_path":
        data = str(tmp_path / "no" / "such" / "folder")
    elif case == "no_image_column":
        data = _dataset_on_disk(tmp_path / "ds", text=["a", "b"], label=[0, 1])
    elif case == "corrupt_image":
        data = shutil.copytree(digits_dir, tmp_path / "digits")
        (data / "one" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        data = str(data)
    elif case == "too_many_classes":
        ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "label": [0, 1000]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.ClassLabel(num_classes=1001)}))
        ds.save_to_disk(str(tmp_path / "ds"))
        data = str(tmp_path / "ds")
    elif case == "bank_of_another_dit":
        import generate_memory_bank
        from fixtures.small_dit import build_pipeline

        build_pipeline(resolution=16).save_pretrained(tmp_path / "other")
        run_script(generate_memory_bank, ["--pretrained_model_name_or_path", str(tmp_path / "other"),
                                          "--output_dir", str(tmp_path / "bank"), "--size", "2",
                                          "--num_inference_steps", "2"])
        extra = ["--memory_bank", str(tmp_path / "bank")]
    elif case == "smaller_than_batch":
        data = _dataset_on_disk(tmp_path / "ds", image=[Image.new("RGB", (8, 8))] * 3, label=[0, 1, 2])
    elif case == "resolution":
        extra = ["--resolution", "16"]
    elif case == "difffit_blocks":  # caught before the memory bank is generated
        extra = ["--tuning", "difffit", "--difffit_blocks", "3"]
    model = str(tmp_path / "no_model") if case == "missing_model" else tiny_pipeline_dir
    if case == "not_a_dit":
        model = tiny_ddpm_dir
    with pytest.raises(UserError, match=message):
        train(model, data, tmp_path / "out", *extra)
    assert _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flags,message", [
    (["--tau", "-0.5"], "--tau must be >= 0"),
    (["--retention_ratio", "1.0"], r"--retention_ratio must be in \[0, 1\)"),
    (["--retention_ratio", "-0.1"], r"--retention_ratio must be in \[0, 1\)"),
    (["--retention_ratio", "0.01"], "rounds to 0 memory-bank samples"),
    (["--tau", "0"], "zero everywhere"),
    (["--enable_xformers_memory_efficient_attention"], "needs a CUDA GPU"),
    (["--validation_inference_steps", "0"], "--validation_inference_steps must be >= 1"),
    (["--memory_bank_inference_steps", "0"], "--memory_bank_inference_steps must be >= 1"),
    (["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
])
def test_impossible_hyperparameters(flags, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=message):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", *flags])


@pytest.mark.parametrize("flags,message", [
    (["--lr_scheduler", "cosinus"], "invalid choice: 'cosinus'"),
    (["--report_to", "tensorbord"], "invalid choice: 'tensorbord'"),
])
def test_unknown_names_are_refused_by_the_parser(flags, message, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", *flags])
    assert message in capsys.readouterr().err


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="--report_to wandb needs the wandb package"):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--report_to", "wandb"])


@pytest.mark.cli
def test_bank_command_refuses_a_missing_or_wrong_model_and_another_models_bank(
        tiny_ddpm_dir, tiny_pipeline_dir, tiny_bank_dir, tmp_path):
    import generate_memory_bank

    with pytest.raises(UserError, match=r"none does not exist \(no such folder"):
        run_script(generate_memory_bank, ["--pretrained_model_name_or_path", str(tmp_path / "none"), "--output_dir",
                                          str(tmp_path / "bank")])
    proc = run_module("generate_memory_bank", "--pretrained_model_name_or_path", tiny_ddpm_dir, "--output_dir",
                      str(tmp_path / "bank"), check=False)  # and as a user sees it: one line, no traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is a DDPMPipeline (unet UNet2DModel); generate_memory_bank.py takes" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bank").exists()
    # A finished bank of another model in --output_dir is refused, not reported as done.
    from fixtures.small_dit import build_pipeline

    build_pipeline(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="was made with base_model"):
        run_script(generate_memory_bank, ["--pretrained_model_name_or_path", str(tmp_path / "other"),
                                          "--output_dir", tiny_bank_dir])


def test_xformers_flag_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "xformers" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="needs the xformers package"):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y",
                           "--enable_xformers_memory_efficient_attention"])


@pytest.mark.cli
@pytest.mark.parametrize("flags", [["--tau", "-1"], ["--dataset_corrupt"]])
def test_errors_are_one_line_without_traceback(flags, tiny_pipeline_dir, digits_dir, tmp_path):
    data = digits_dir
    if flags == ["--dataset_corrupt"]:
        data = str(shutil.copytree(digits_dir, tmp_path / "digits"))
        with open(os.path.join(data, "two", "broken.png"), "wb") as f:
            f.write(b"garbage")
        flags = []
    proc = subprocess.run([sys.executable, "train_diff_tuning_dit.py", "--pretrained_model_name_or_path",
                           tiny_pipeline_dir, "--dataset", data, "--output_dir", str(tmp_path / "out"), *TINY_ARGS,
                           *flags], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "checking images" not in line]
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _nothing_written(tmp_path / "out")


def test_help_documents_every_flag_with_its_default():
    help_text = cli_help(script)
    parser_flags = [a for a in help_text.split() if a.startswith("--")]
    assert {"--tau", "--xi_form", "--retention_ratio", "--retention_weight", "--memory_bank_size",
            "--cache_latents", "--resume_from_checkpoint", "--push_to_hub"} <= set(parser_flags)
    text = " ".join(help_text.split())  # argparse wraps lines anywhere
    assert "(default: 24000)" in text and "(default: 0.5)" in text


def test_checkpoint_rotation_keeps_the_newest(tiny_pipeline_dir, digits_dir, tmp_path):
    train(tiny_pipeline_dir, digits_dir, tmp_path, "--method", "standard", "--max_train_steps", "5",
          "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]


def test_loading_a_dit_pipeline_with_class_names_prints_no_type_note(tiny_pipeline_dir, tmp_path):
    """model_index.json's id2label (string keys, as the Hub's DiT) loads without diffusers' "Expected types for
    id2label" note; other pipeline warnings still get through."""
    from diffusers.utils import logging as diffusers_logging

    from utils.families.dit import DiT

    folder = tmp_path / "named"
    shutil.copytree(tiny_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "zero", "1": "one"}}))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    library = diffusers_logging.get_logger("diffusers")
    library.addHandler(handler)
    try:
        pipe = DiT.load(str(folder))
        diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils").warning("Expected types for unet: x")
    finally:
        library.removeHandler(handler)
    assert pipe.labels == {"zero": 0, "one": 1}
    assert not any("id2label" in m for m in seen) and "Expected types for unet: x" in seen
