"""The newest entry points refuse bad input in one `error:` line that names the user's flag and value, before any
pipeline weights load, any bank or sample is generated, and with nothing written that looks complete (issue
"refuse bad input before loading anything")."""

import json
import os

import pytest

import check_premise
import generate_memory_bank
import train_bi_tuning
import train_deme
import train_diff_tuning_controlnet
import train_diff_tuning_dit
import train_diff_tuning_text_to_image as t2i
from fixtures.in_process import run_script
from fixtures.testing import TEXT_TO_IMAGE_TINY, TINY_ARGS, cli_error


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading any pipeline or model weights, or generating a bank, fails the test: a refusal must come first."""
    import diffusers

    import utils.methods.memory_bank as memory_bank

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded (or a bank generated) before the input was refused")

    for cls in (diffusers.DiffusionPipeline, diffusers.ModelMixin):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(memory_bank, "build_memory_bank", loaded)


def nothing_finished(folder) -> bool:
    """The output folder holds nothing a finished run or bank would: no card, weights or bank record."""
    return not any(name in ("README.md", "memory_bank", "memory_bank.json") or name.endswith(".safetensors")
                   for _, dirs, files in os.walk(folder) for name in dirs + files)


def t2i_error(model, data, out, *extra):
    return cli_error(t2i, ["--pretrained_model_name_or_path", model, "--dataset", data, "--output_dir", str(out),
                           *TEXT_TO_IMAGE_TINY, *extra])


def test_resolutions_the_model_cannot_take(tiny_sd_dir, tiny_sd3_dir, tiny_pipeline_dir, captioned_digits_dir,
                                           digits_dir, tmp_path, nothing_loads):
    # SD3: a multiple of the VAE's factor (2) but not of factor x patch size (2 x 2), as 1000 for the real SD3
    assert ("error: --resolution 18 is not a multiple of 4 (the VAE's factor 2 x the transformer's patch size 2)"
            in t2i_error(tiny_sd3_dir, captioned_digits_dir, tmp_path / "a", "--resolution", "18",
                         "--max_sequence_length", "16"))
    assert "error: --resolution 15 is not a multiple of the VAE's factor 2" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, tmp_path / "b", "--resolution", "15")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit\n")
    assert "error: --resolution 18 is not a multiple of 4" in cli_error(generate_memory_bank, [
        "--pretrained_model_name_or_path", tiny_sd3_dir, "--output_dir", str(tmp_path / "bank"), "--prompts_file",
        str(prompts), "--resolution", "18", "--max_sequence_length", "16"])
    assert "error: --resolution 15 is not a multiple of the VAE's factor 2" in cli_error(generate_memory_bank, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--output_dir", str(tmp_path / "bank"), "--resolution", "15"])
    premise = ["--dataset", digits_dir, "--output_dir", str(tmp_path / "premise")]
    assert "error: --resolution 15 is not a multiple of the VAE's factor 2" in cli_error(check_premise, [
        "--pretrained_model_name_or_path", tiny_sd_dir, *premise, "--resolution", "15"])
    # a DiT takes its own size only (the tiny one: 8 px); a verdict on two sizes would compare nothing
    assert "error: --resolution 16 gives 8x latents but the model takes 4x; use --resolution 8" in cli_error(
        check_premise, ["--pretrained_model_name_or_path", tiny_pipeline_dir, *premise, "--resolution", "16"])
    assert all(nothing_finished(tmp_path / d) for d in ("a", "b")) and not (tmp_path / "bank").exists()
    assert not (tmp_path / "premise" / "premise.json").exists()


def test_non_finite_float_flags_are_refused_by_every_entry_point(tiny_sd_dir, tiny_pipeline_dir, tiny_ddpm_dir,
                                                                 captioned_digits_dir, digits_dir, control_digits_dir,
                                                                 tmp_path, nothing_loads):
    out = str(tmp_path / "out")
    common = ["--output_dir", out]
    assert "error: --learning_rate must be a finite number, got nan" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, out, "--learning_rate", "nan")
    assert "error: --learning_rate must be a finite number, got inf" in cli_error(train_diff_tuning_dit, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir, *common, *TINY_ARGS,
        "--learning_rate", "inf"])
    assert "error: --retention_ratio must be a finite number, got nan" in cli_error(train_diff_tuning_controlnet, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir, *common,
        "--retention_ratio", "nan"])
    assert "error: --learning_rate must be a finite number, got nan" in cli_error(train_deme, [
        "--pretrained_model_name_or_path", tiny_ddpm_dir, "--dataset", digits_dir, *common, "--learning_rate", "nan"])
    assert "error: --learning_rate must be a finite number, got -inf" in cli_error(train_bi_tuning, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", digits_dir, *common, "--learning_rate=-inf"])
    assert "error: --guidance_scale must be a finite number, got nan" in cli_error(generate_memory_bank, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, *common, "--guidance_scale", "nan"])
    assert "error: --handoff_fractions must be a finite number, got inf" in cli_error(check_premise, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir, *common,
        "--handoff_fractions", "0.1", "inf"])
    assert not os.path.exists(out)


def test_sd3_t5_length_vae_flags_and_missing_paths(tiny_sd_dir, tiny_sd3_dir, captioned_digits_dir,
                                                    control_digits_dir, tmp_path, nothing_loads):
    assert "error: --max_sequence_length 600 is more than SD3's T5 takes (512 tokens)" in t2i_error(
        tiny_sd3_dir, captioned_digits_dir, tmp_path / "a", "--max_sequence_length", "600")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit\n")
    assert "error: --max_sequence_length 600 is more than SD3's T5 takes" in cli_error(generate_memory_bank, [
        "--pretrained_model_name_or_path", tiny_sd3_dir, "--output_dir", str(tmp_path / "bank"), "--prompts_file",
        str(prompts), "--resolution", "16", "--max_sequence_length", "600"])
    nowhere = str(tmp_path / "nowhere")
    assert f"error: --pretrained_vae_model_name_or_path {nowhere} does not exist" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, tmp_path / "b", "--pretrained_vae_model_name_or_path", nowhere)
    unet = os.path.join(tiny_sd_dir, "unet")
    assert f"error: --pretrained_vae_model_name_or_path {unet} holds a UNet2DConditionModel, not an AutoencoderKL" \
        in cli_error(train_diff_tuning_controlnet, [
            "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir, "--output_dir",
            str(tmp_path / "c"), "--resolution", "16", "--pretrained_vae_model_name_or_path", unet])
    assert f"error: {nowhere} does not exist" in t2i_error(nowhere, captioned_digits_dir, tmp_path / "d")
    assert f"error: {nowhere} does not exist" in cli_error(check_premise, [
        "--pretrained_model_name_or_path", nowhere, "--dataset", captioned_digits_dir, "--output_dir",
        str(tmp_path / "e")])
    assert all(nothing_finished(tmp_path / d) for d in "abcde") and not (tmp_path / "bank").exists()


def test_messages_name_the_alias_the_user_typed(tiny_sd_dir, captioned_digits_dir, tmp_path, nothing_loads):
    dreambooth = ["--with_prior_preservation", "--class_prompt", "a digit"]
    assert "error: --prior_loss_weight must be >= 0, got -1.0" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, tmp_path / "a", *dreambooth, "--prior_loss_weight", "-1")
    assert "error: --retention_weight must be >= 0, got -1.0" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, tmp_path / "b", "--retention_weight", "-1")
    assert "error: --prior_loss_weight must be a finite number, got nan" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, tmp_path / "c", *dreambooth, "--prior_loss_weight", "nan")
    not_a_bank = tmp_path / "class_images"
    not_a_bank.mkdir()
    (not_a_bank / "notes.txt").write_text("mine")
    assert f"error: --class_data_dir {not_a_bank} holds no images" in t2i_error(
        tiny_sd_dir, captioned_digits_dir, tmp_path / "d", *dreambooth, "--class_data_dir", str(not_a_bank))
    assert (not_a_bank / "notes.txt").read_text() == "mine" and os.listdir(not_a_bank) == ["notes.txt"]


def test_a_checkpoint_of_another_script_is_refused_before_loading(tiny_sd_dir, captioned_digits_dir,
                                                                  control_digits_dir, tmp_path, monkeypatch):
    controlnet_out = tmp_path / "controlnet"
    run_script(train_diff_tuning_controlnet, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir, "--output_dir",
        str(controlnet_out), "--resolution", "16", "--train_batch_size", "2", "--method", "standard",
        "--max_train_steps", "1", "--checkpointing_steps", "1", "--validation_steps", "0", "--num_validation_samples",
        "2", "--validation_inference_steps", "1", "--report_to", "none"])
    record = json.loads((controlnet_out / "checkpoint-1" / "training_run.json").read_text())
    assert record["script"] == "train_diff_tuning_controlnet.py" and record["family"] == "stable-diffusion"
    import diffusers

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before the checkpoint was refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(loaded))
    message = t2i_error(tiny_sd_dir, captioned_digits_dir, tmp_path / "t2i", "--resume_from_checkpoint",
                        str(controlnet_out / "checkpoint-1"))
    assert (f"error: checkpoint {controlnet_out / 'checkpoint-1'} was written by train_diff_tuning_controlnet.py "
            "(stable-diffusion); this run is train_diff_tuning_text_to_image.py (stable-diffusion)") in message
    assert nothing_finished(tmp_path / "t2i")


def test_a_custom_annotator_that_returns_no_image_is_refused_before_the_bank(tiny_sd_dir, control_digits_dir,
                                                                             tmp_path, nothing_loads):
    module = tmp_path / "array_annotator.py"
    module.write_text("import numpy as np\n\ndef edges(image):\n    return np.zeros((16, 16, 3), dtype=np.uint8)\n")
    custom = ["--condition", "custom", "--annotator", f"{module}:edges", "--resolution", "16"]
    threshold = ["--convergence_threshold", "0.5"]
    assert "returned a ndarray, not a PIL image" in cli_error(train_diff_tuning_controlnet, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir, "--output_dir",
        str(tmp_path / "out"), *custom, *threshold])
    assert "returned a ndarray, not a PIL image" in cli_error(generate_memory_bank, [
        "--pretrained_model_name_or_path", tiny_sd_dir, "--output_dir", str(tmp_path / "bank"), *custom])
    assert nothing_finished(tmp_path / "out") and not (tmp_path / "bank").exists()
