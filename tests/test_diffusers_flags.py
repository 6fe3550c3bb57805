"""The diffusers examples' flags the text-to-image script takes (issue 29): each changes the run as the example's
does, a bad one is refused before anything loads, and the run says what it will cost before it starts."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.testing import LORA_FILE, TEXT_TO_IMAGE_TINY, cli_error, run_main

pytestmark = pytest.mark.beside  # run in the second pytest: balances the two cores (fixtures/beside.py)

STANDARD = [*TEXT_TO_IMAGE_TINY, "--method", "standard", "--validation_steps", "0"]


def test_lora_layers_and_dropout_choose_and_regularise_the_adapters(tiny_sd_dir, captioned_digits_dir, tmp_path):
    run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / "qv", *STANDARD, "--lora_layers", "to_q,to_v")
    keys = load_file(tmp_path / "qv" / LORA_FILE)
    assert keys and {k.split(".")[-4] for k in keys} == {"to_q", "to_v"}, sorted(keys)[:4]
    run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / "plain", *STANDARD)
    run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / "dropout", *STANDARD, "--lora_dropout", "0.5")
    plain, dropout = load_file(tmp_path / "plain" / LORA_FILE), load_file(tmp_path / "dropout" / LORA_FILE)
    assert set(plain) == set(dropout) and not all(torch.equal(plain[k], dropout[k]) for k in plain)


def test_text_encoder_lr_gives_the_encoders_adapters_their_own_rate(tiny_sd_dir, captioned_digits_dir, tmp_path,
                                                                  monkeypatch):
    seen = {}
    original = script.training.make_optimizer

    def recording(groups, *a, **k):
        seen["groups"] = groups
        return original(groups, *a, **k)

    monkeypatch.setattr(script.training, "make_optimizer", recording)
    run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / "te", *STANDARD, "--train_text_encoder",
             "--text_encoder_lr", "5e-5")
    unet_group, encoder_group = seen["groups"]
    assert encoder_group["lr"] == 5e-5 and unet_group["lr"] == 1e-3  # the UNet adapters: --learning_rate
    assert len(encoder_group["params"]) > 0 and len(unet_group["params"]) > 0


def test_repeats_validation_epochs_and_the_running_training_block(tiny_sd_dir, captioned_digits_dir, tmp_path,
                                                                  caplog):
    """64 images x --repeats 2 at 4 data rows a step: 32 steps an epoch; --validation_epochs 1 validates at step 32
    (and the end of the run at 40);
    the log's "Running training" block says so, and the bank's cost is said before it is made."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    flags = [f for f in TEXT_TO_IMAGE_TINY]
    flags[flags.index("--max_train_steps") + 1] = "40"
    run_main(script, tiny_sd_dir, captioned_digits_dir, out, *flags, "--repeats", "2", "--validation_steps", "0",
             "--validation_epochs", "1", "--checkpointing_steps", "100", "--sample_batch_size", "2")
    log = caplog.text
    assert "***** Running training *****" in log and "Num examples = 128" in log and "Num Epochs = 2" in log
    assert "Data rows per micro batch = 4" in log and "Memory bank rows per micro batch = 4" in log
    assert "memory bank to generate: 8 samples x 2 steps x 2 (guidance) = 32 denoiser passes" in log
    assert json.loads((out / "memory_bank" / "memory_bank.json").read_text())["batch_size"] == 2
    probed = [r.getMessage() for r in caplog.records if "forgetting probe" in r.getMessage()]
    assert [m.split(":")[0].split()[-1] for m in probed] == ["32", "40"]  # the epoch's end, then the final one


@pytest.mark.parametrize("extra, message", [
    (["--lora_layers", "to_q,to_zz"], "--lora_layers: no module of the UNet2DConditionModel is called to_zz"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--text_encoder_lr", "0"], "--text_encoder_lr must be > 0"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--validation_batch_size", "0"], "--validation_batch_size must be >= 1"),
    (["--lora_layers", "to_q", "--tuning", "full"], "--lora_layers names where LoRA adapters go"),
])
def test_bad_flags_are_one_line(extra, message, tiny_sd_dir, captioned_digits_dir, tmp_path):
    argv = ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", captioned_digits_dir, "--output_dir",
            str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY, *extra]
    assert message in cli_error(script, argv)
    assert not (tmp_path / "out" / "memory_bank").exists()


def test_defaults_follow_the_example_the_command_line_stands_for():
    t2i = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y"])
    assert (t2i.learning_rate, t2i.train_batch_size, t2i.lr_warmup_steps, t2i.adam_weight_decay,
            t2i.num_validation_images, t2i.validation_batch_size) == (1e-4, 16, 500, 1e-2, 4, 1)
    dreambooth = script.parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "y",
                                    "--instance_prompt", "a photo of sks dog"])
    assert (dreambooth.learning_rate, dreambooth.train_batch_size) == (5e-4, 4)
    assert script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--instance_prompt", "z",
                              "--learning_rate", "1e-3"]).learning_rate == 1e-3


def test_dora_adapters_train_and_load_in_the_stock_pipeline(tiny_sd_dir, captioned_digits_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from fixtures.testing import generates

    run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / "dora", *STANDARD, "--use_dora")
    weights = load_file(tmp_path / "dora" / LORA_FILE)
    assert any("dora_scale" in k or "magnitude" in k for k in weights), sorted(weights)[:6]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "dora")
    assert generates(pipe)


def test_prodigy_is_built_as_diffusers_builds_it(tiny_sd_dir, captioned_digits_dir, tmp_path, monkeypatch):
    """prodigyopt is not installed here: a stand-in module records the arguments (AdamW underneath, which takes the
    same params, lr, betas, weight decay and eps), so the wiring is what is tested, not Prodigy."""
    import sys
    import types

    seen = {}

    class Prodigy(torch.optim.AdamW):
        def __init__(self, params, beta3, decouple, use_bias_correction, safeguard_warmup, **kw):
            seen.update(beta3=beta3, decouple=decouple, use_bias_correction=use_bias_correction,
                        safeguard_warmup=safeguard_warmup, **{k: v for k, v in kw.items() if k != "params"})
            super().__init__(params, **kw)

    module = types.ModuleType("prodigyopt")
    module.Prodigy = Prodigy
    module.__spec__ = types.SimpleNamespace(name="prodigyopt")
    monkeypatch.setitem(sys.modules, "prodigyopt", module)
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "prodigyopt"
                        else real_find_spec(n, *a))
    run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / "p", *STANDARD, "--optimizer", "Prodigy",
             "--learning_rate", "1.0", "--prodigy_decouple", "false", "--prodigy_beta3", "0.99")
    assert seen == {"beta3": 0.99, "decouple": False, "use_bias_correction": True, "safeguard_warmup": True,
                    "lr": 1.0, "betas": (0.9, 0.999), "weight_decay": 0, "eps": 1e-8}


def test_prodigy_without_prodigyopt_and_dora_with_full_tuning_are_refused(tiny_sd_dir, captioned_digits_dir,
                                                                          tmp_path):
    argv = ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", captioned_digits_dir, "--output_dir",
            str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY]
    assert "--optimizer prodigy needs prodigyopt (pip install prodigyopt)" in cli_error(
        script, [*argv, "--optimizer", "prodigy"])
    assert "--use_dora trains DoRA adapters: use it with --tuning lora" in cli_error(
        script, [*argv, "--use_dora", "--tuning", "full"])


def test_prior_generation_precision_sets_the_banks_autocast(tiny_sd_dir, captioned_digits_dir, tmp_path,
                                                            monkeypatch):
    seen = []
    original = script.DiffTuning.open_bank

    def recording(self, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, *a, **k)

    monkeypatch.setattr(script.DiffTuning, "open_bank", recording)
    for precision in ("fp32", "bf16"):
        run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / precision, *TEXT_TO_IMAGE_TINY,
                 "--with_prior_preservation", "--class_prompt", "a digit", "--prior_generation_precision", precision,
                 "--validation_steps", "0", "--max_train_steps", "1")
    assert seen == [(False, seen[0][1]), (True, torch.bfloat16)]


def test_cached_latents_are_the_moments_training_would_encode_and_train(tiny_sdxl_dir, captioned_digits_dir,
                                                                       tmp_path):
    """--cache_latents: each row's cached moments are the VAE's moments of its crop (and of its mirror), the SDXL
    size ids record that crop (the mirrored one for a mirrored row); a run trains and saves with it."""
    from diffusers import StableDiffusionXLPipeline

    from utils.families.sdxl import StableDiffusionXL
    from utils.infra.data import load_image_dataset

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    family = StableDiffusionXL(pipe, "cpu", random_flip=True, center_crop=True)
    ds = load_image_dataset(captioned_digits_dir).select(range(6))
    cached = family.cache_latents(ds, "image", "text", 16, 0, ["tiny"])
    batch = family.collate([cached[i] for i in range(6)])
    live = family.collate([ds.with_transform(family.transform("image", "text", 16))[i] for i in range(6)])
    with torch.no_grad():
        for seed in range(4):
            flips = family.flips(6, torch.Generator().manual_seed(seed))
            got = family.rows(batch, torch.Generator().manual_seed(seed))
            want = family.rows(live, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(got.x, want.x, atol=1e-5, rtol=1e-4)
            assert torch.equal(got.cond["time_ids"], want.cond["time_ids"]) and torch.equal(
                got.cond["input_ids"], want.cond["input_ids"])
            if flips.any() and not flips.all():
                break
    run_main(script, tiny_sdxl_dir, captioned_digits_dir, tmp_path / "cached", *STANDARD, "--cache_latents",
             "--random_flip")
    assert load_file(tmp_path / "cached" / LORA_FILE)


def test_lora_blocks_put_sd3_adapters_on_those_blocks_only(tiny_sd3_dir, tiny_sd_dir, captioned_digits_dir,
                                                           tmp_path):
    run_main(script, tiny_sd3_dir, captioned_digits_dir, tmp_path / "b", *STANDARD, "--max_sequence_length", "16",
             "--lora_blocks", "0", "--lora_layers", "attn.to_q,attn.to_v")
    keys = load_file(tmp_path / "b" / LORA_FILE)
    assert keys and all(".transformer_blocks.0.attn.to_q." in k or ".transformer_blocks.0.attn.to_v." in k
                        for k in keys), sorted(keys)[:4]
    assert "error: --lora_blocks: the SD3Transformer2DModel has transformer blocks 0..0, not 5" in cli_error(
        script, [
            "--pretrained_model_name_or_path", tiny_sd3_dir, "--dataset", captioned_digits_dir, "--output_dir",
            str(tmp_path / "out5"), *TEXT_TO_IMAGE_TINY, "--max_sequence_length", "16", "--lora_blocks", "5"])
    assert "--lora_blocks: SD3's" in cli_error(script, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", captioned_digits_dir, "--output_dir",
        str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY, "--lora_blocks", "0"])
