import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import merge_timestep_models
import train_deme as script
from fixtures.in_process import run_script
from fixtures.small_unet import build_ddpm_pipeline, build_sd_pipeline
from fixtures.testing import ROOT, cli_error, cli_help, killed_at_first_checkpoint, run_main
from utils.infra.errors import UserError
from utils.methods import channel_projection as cp

TINY = ["--train_batch_size", "8", "--validation_steps", "0", "--num_validation_images", "2",
        "--validation_inference_steps", "2", "--report_to", "none", "--learning_rate", "1e-3", "--num_ranges", "2"]


def train(pipeline_dir, data_dir, out, *extra):
    return run_main(script, pipeline_dir, data_dir, out, *TINY, *extra)


def unet_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def base_unet_weights(pipeline_dir):
    return unet_weights(os.path.join(pipeline_dir, "unet"))


def unet_call(unet, x, t):
    cond = torch.randn(len(x), 16, 16, generator=torch.Generator().manual_seed(1)) \
        if isinstance(unet, UNet2DConditionModel) else None
    return unet(x, t, encoder_hidden_states=cond).sample if cond is not None else unet(x, t).sample


@pytest.mark.parametrize("kind", ["ddpm", "sd"])
def test_foldable_projections_fold_exactly_into_a_stock_unet(kind, tmp_path):
    unet = build_ddpm_pipeline().unet if kind == "ddpm" else build_sd_pipeline(str(tmp_path / "tok")).unet
    stock_keys = set(unet.state_dict())
    params = cp.add_projections(unet, "foldable")
    assert len(params) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert all(torch.equal(p, torch.eye(len(p))) for p in params)  # identity at initialisation
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(p))))
    g = torch.Generator().manual_seed(0)
    c = unet.config.in_channels
    x = torch.randn(3, c, unet.config.sample_size, unet.config.sample_size, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    with torch.no_grad():
        projected = unet_call(unet, x, t)
        cp.fold_projections(unet)
        assert set(unet.state_dict()) == stock_keys  # nothing extra left
        unet.save_pretrained(tmp_path / "folded")
        stock = type(unet).from_pretrained(tmp_path / "folded")
        folded = unet_call(stock, x, t)
    assert (projected - folded).abs().max() < 1e-5
    assert (projected - unet_call(build_ddpm_pipeline().unet if kind == "ddpm" else
                                  build_sd_pipeline(str(tmp_path / "tok2")).unet, x, t)).abs().max() > 1e-3


def test_official_projections_are_saved_beside_and_reattached(tmp_path):
    unet = build_ddpm_pipeline().unet
    cp.add_projections(unet, "official")
    with torch.no_grad():
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.channel_projection.projection.add_(0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        expected = unet(x, t).sample
        maps = cp.split_official_projections(unet)
        unet.save_pretrained(tmp_path)
        cp.save_official_projections(maps, tmp_path)
        stock = UNet2DModel.from_pretrained(tmp_path)
        assert (stock(x, t).sample - expected).abs().max() > 1e-3  # stock loading leaves the maps out
        restored = cp.attach_saved_projections(stock, tmp_path)(x, t).sample
    assert torch.allclose(restored, expected, atol=1e-6)


@pytest.mark.cli
def test_deme_trains_each_range_then_merges_into_a_stock_pipeline(tiny_ddpm_dir, digits_dir, tmp_path):
    out, merged = tmp_path / "deme", tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train_deme.py",
         "--pretrained_model_name_or_path", tiny_ddpm_dir, "--dataset", digits_dir, "--output_dir", str(out),
         *TINY, "--max_train_steps", "3", "--validation_steps", "2", "--checkpointing_steps", "2",
         "--report_to", "tensorboard", "--use_ema", "--ema_decay", "0.5"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "deme_manifest.json").read_text())
    assert [r["timesteps"] for r in manifest["ranges"]] == [[0, 500], [500, 1000]]
    base = base_unet_weights(tiny_ddpm_dir)
    for i in range(2):
        folder = out / f"range_{i}"
        weights = unet_weights(folder)
        assert set(weights) == set(base)  # projections folded: a stock UNet2DModel state dict
        assert any(not torch.equal(base[k], weights[k]) for k in base)
        UNet2DModel.from_pretrained(folder)
        card = ModelCard.load(folder / "README.md")
        assert {"deme", "diffusers-training"} <= set(card.data.tags) and card.data.base_model is None
        assert glob.glob(str(folder / "logs" / "**" / "events.out.tfevents*"), recursive=True)
        assert (folder / "checkpoint-2").is_dir() and (folder / "samples.png").exists()
    assert not torch.equal(unet_weights(out / "range_0")["conv_in.weight"],
                           unet_weights(out / "range_1")["conv_in.weight"])

    # the merge in this process (its command line as a user sees it: tests/test_data_safety.py)
    run_script(merge_timestep_models, ["--base_model", tiny_ddpm_dir, "--models", str(out), "--weights", "0.3", "0.7",
                                       "--output_dir", str(merged)])
    pipe = DDPMPipeline.from_pretrained(merged)
    images = pipe(num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 8, 8, 3) and torch.isfinite(torch.from_numpy(images)).all()
    card = ModelCard.load(merged / "README.md")
    assert {"deme", "merge"} <= set(card.data.tags) and "0.3 0.7" in card.content


def test_timesteps_come_from_the_range_and_the_consistency_loss_holds_the_copy_back(
        tiny_ddpm_dir, digits_dir, tmp_path, monkeypatch):
    seen = []
    real = script.RangeTimestepSampler.sample

    def record(self, *a, **kw):
        t = real(self, *a, **kw)
        seen.append(t)
        return t

    monkeypatch.setattr(script.RangeTimestepSampler, "sample", record)
    train(tiny_ddpm_dir, digits_dir, tmp_path / "a", "--range_index", "1", "--global_sample_prob", "0",
          "--max_train_steps", "4", "--consistency_weight", "0")
    t = torch.cat(seen)
    assert len(t) == 32 and t.min() >= 500 and t.max() < 1000
    monkeypatch.setattr(script.RangeTimestepSampler, "sample", real)

    base = base_unet_weights(tiny_ddpm_dir)

    def distance(folder):
        w = unet_weights(folder)
        return sum((w[k] - base[k]).pow(2).sum() for k in base).sqrt()

    train(tiny_ddpm_dir, digits_dir, tmp_path / "b", "--range_index", "1", "--global_sample_prob", "0",
          "--max_train_steps", "4", "--consistency_weight", "20", "--channel_projection", "none")
    train(tiny_ddpm_dir, digits_dir, tmp_path / "c", "--range_index", "1", "--global_sample_prob", "0",
          "--max_train_steps", "4", "--consistency_weight", "0", "--channel_projection", "none")
    # Adam normalises step sizes, so compare where the loss pulls: a strong consistency term keeps the copy nearer.
    assert distance(tmp_path / "b" / "range_1") < distance(tmp_path / "c" / "range_1")


def test_min_snr_weighting_changes_training_and_a_huge_gamma_is_the_plain_loss(tiny_ddpm_dir, digits_dir, tmp_path):
    common = ["--range_index", "0", "--max_train_steps", "3", "--consistency_weight", "0",
              "--channel_projection", "none"]
    runs = {}
    for name, flags in {"plain": [], "huge": ["--snr_gamma", "1e9"], "five": ["--snr_gamma", "5"]}.items():
        train(tiny_ddpm_dir, digits_dir, tmp_path / name, *common, *flags)
        runs[name] = unet_weights(tmp_path / name / "range_0")
    assert all(torch.equal(runs["plain"][k], runs["huge"][k]) for k in runs["plain"])  # min(SNR, 1e9) / SNR = 1
    assert any(not torch.equal(runs["plain"][k], runs["five"][k]) for k in runs["plain"])
    assert "| `snr_gamma` | `5.0` |" in (tmp_path / "five" / "range_0" / "README.md").read_text()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_matches_uninterrupted_run(tiny_ddpm_dir, digits_dir, tmp_path, monkeypatch, accumulation):
    common = ["--range_index", "0", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--gradient_accumulation_steps", str(accumulation), "--use_ema", "--ema_decay", "0.5"]
    train(tiny_ddpm_dir, digits_dir, tmp_path / "full", *common)
    killed_at_first_checkpoint(monkeypatch, lambda: train(tiny_ddpm_dir, digits_dir, tmp_path / "resumed", *common))
    assert not (tmp_path / "resumed" / "range_0" / "README.md").exists()
    train(tiny_ddpm_dir, digits_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    full, resumed = unet_weights(tmp_path / "full" / "range_0"), unet_weights(tmp_path / "resumed" / "range_0")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # A finished range is skipped on the next `latest` run.
    assert train(tiny_ddpm_dir, digits_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest") == {}


@pytest.mark.cli
def test_two_processes_every_range_with_scale_lr(tiny_ddpm_dir, digits_dir, tmp_path):
    """All ranges in turn under torchrun (the second range used to crash: accelerate's end_training ended the
    process group), the ranks in step, one writer, and --scale_lr computed once (it used to compound per range)."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train_deme as s\n"
        "models = s.main(s.parse_args(sys.argv[1:]))\n"
        f"torch.save(models[1].state_dict(), os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(wrapper),
         "--pretrained_model_name_or_path", tiny_ddpm_dir, "--dataset", digits_dir, "--output_dir", str(out),
         *TINY, "--max_train_steps", "3", "--checkpointing_steps", "2", "--learning_rate", "1e-4", "--scale_lr",
         "--gradient_accumulation_steps", "2"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The processes know each other before the first Accelerator: one progress bar, one manifest writer.
    assert proc.stderr.count("checking images: 100%") == 1
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    written = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**"), recursive=True))
    assert {"range_0/checkpoint-2/random_states_0.pkl", "range_1/checkpoint-2/random_states_0.pkl"} <= set(written)
    assert not [p for p in written if "random_states_1" in p or p.endswith(".tmp")]
    # lr x accumulation 2 x batch 8 x processes 2, the same for both ranges
    rates = [[line for line in (out / f"range_{i}" / "README.md").read_text().splitlines()
              if line.startswith("| `learning_rate`")] for i in range(2)]
    assert rates == [["| `learning_rate` | `0.0032` |"]] * 2


def test_stable_diffusion_with_official_projections_and_bf16(tiny_sd_dir, captioned_digits_dir, tmp_path):
    out = tmp_path / "sd"
    train(tiny_sd_dir, captioned_digits_dir, out, "--range_index", "1", "--max_train_steps", "3",
          "--channel_projection", "official", "--mixed_precision", "bf16")
    folder = out / "range_1"
    unet = UNet2DConditionModel.from_pretrained(folder)
    base = base_unet_weights(tiny_sd_dir)
    weights = unet_weights(folder)
    assert set(weights) == set(base) and any(not torch.equal(base[k], weights[k]) for k in base)
    maps = load_file(folder / cp.PROJECTION_FILE)
    assert len(maps) == 5 and any(not torch.equal(m, torch.eye(len(m))) for m in maps.values())
    cp.attach_saved_projections(unet, str(folder))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, unet=unet, safety_checker=None)
    images = pipe("a digit two", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("flags,message", [
    (["--num_ranges", "0"], "--num_ranges must be >= 1"),
    (["--global_sample_prob", "1.5"], r"--global_sample_prob must be in \[0, 1\]"),
    (["--global_sample_prob", "-0.1"], r"--global_sample_prob must be in \[0, 1\]"),
    (["--range_index", "2"], "--range_index must be in 0..1 for --num_ranges 2"),
    (["--consistency_weight", "-1"], "--consistency_weight must be >= 0"),
    (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
])
def test_impossible_hyperparameters(flags, message):
    with pytest.raises(UserError, match=message):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", *TINY, *flags])


@pytest.mark.parametrize("case,message", [
    ("sd_without_captions", "a Stable Diffusion model needs captions: dataset has no caption column"),
    ("captions_for_ddpm", "--caption_column given, but .* is an unconditional UNet2DModel pipeline"),
    ("missing_dataset", "does not exist"),
    pytest.param("not_a_unet_pipeline", "is a DiTPipeline .*; DeMe takes an unconditional UNet2DModel pipeline",
                 marks=pytest.mark.cli),  # the case run as a user sees it
    ("wrong_resolution", "--resolution 16 does not match the model, which takes 8x8 images"),
])
def test_bad_input_is_one_line_before_training(case, message, tiny_ddpm_dir, tiny_sd_dir, tiny_pipeline_dir,
                                               digits_dir, tmp_path):
    model, data, extra = tiny_ddpm_dir, digits_dir, []
    if case == "sd_without_captions":
        model = tiny_sd_dir
    elif case == "captions_for_ddpm":
        extra = ["--caption_column", "text"]
    elif case == "missing_dataset":
        data = str(tmp_path / "no" / "such" / "folder")
    elif case == "not_a_unet_pipeline":
        model = tiny_pipeline_dir  # a DiTPipeline
    elif case == "wrong_resolution":
        extra = ["--resolution", "16"]
    argv = ["--pretrained_model_name_or_path", model, "--dataset", data, "--output_dir", str(tmp_path / "out"),
            *TINY, *extra]
    if case == "not_a_unet_pipeline":  # once as a user sees it: one line on stderr, no traceback
        proc = subprocess.run([sys.executable, "train_deme.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
    else:
        last = cli_error(script, argv)
    assert last.startswith("error: ") and __import__("re").search(message, last), last
    assert not glob.glob(str(tmp_path / "out" / "range_*"))


def test_help_documents_every_flag():
    text = cli_help(script)
    for flag in ("--num_ranges", "--range_index", "--global_sample_prob", "--global_sample_mode",
                 "--consistency_weight", "--channel_projection", "--resume_from_checkpoint", "--use_ema"):
        assert flag in text
    flat = " ".join(text.split())  # argparse wraps the help
    assert "(default: 0.3)" in flat and "(default: foldable on UNets, none on SD3 and Flux transformers)" in flat


def test_range_jobs_share_an_output_folder_but_a_finished_range_is_not_rerun(tiny_ddpm_dir, digits_dir, tmp_path):
    """N jobs with --range_index write into one folder: range 1 starts after range 0 finished; running range 0 again
    into it is refused unless resumed or overwritten."""
    common = ["--max_train_steps", "2", "--checkpointing_steps", "2"]
    train(tiny_ddpm_dir, digits_dir, tmp_path, "--range_index", "0", *common)
    train(tiny_ddpm_dir, digits_dir, tmp_path, "--range_index", "1", *common)
    assert (tmp_path / "range_0" / "README.md").exists() and (tmp_path / "range_1" / "README.md").exists()
    with pytest.raises(UserError, match="holds a finished run"):
        train(tiny_ddpm_dir, digits_dir, tmp_path, "--range_index", "0", *common)
