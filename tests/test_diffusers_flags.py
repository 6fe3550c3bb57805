"""The diffusers examples' flags the text-to-image script takes (issue 29): each changes the run as the example's
does, a bad one is refused before anything loads, and the run says what it will cost before it starts."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.testing import LORA_FILE, TEXT_TO_IMAGE_TINY, cli_error, run_main

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
    original = script.make_optimizer

    def recording(groups, *a, **k):
        seen["groups"] = groups
        return original(groups, *a, **k)

    monkeypatch.setattr(script, "make_optimizer", recording)
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
