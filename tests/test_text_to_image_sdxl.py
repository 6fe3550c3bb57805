"""train_diff_tuning_text_to_image.py on a tiny Stable Diffusion XL pipeline: every method with LoRA (both text
encoders too) and full tuning, outputs in the stock StableDiffusionXLPipeline, resume, and refusals."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.testing import (
    LORA_FILE,
    TEXT_TO_IMAGE_TINY,
    bank_of_a_first_run,
    cli_error,
    full_tuning_changed,
    full_tuning_flags,
    generates,
    resume_matches_uninterrupted,
    run_main,
)

TINY = TEXT_TO_IMAGE_TINY


def train(model_dir, data_dir, out, *extra):
    return run_main(script, model_dir, data_dir, out, *TINY, *extra)


@pytest.fixture(scope="module")
def sdxl_bank(tiny_sdxl_dir, captioned_digits_dir, tmp_path_factory):
    return bank_of_a_first_run(train, tiny_sdxl_dir, captioned_digits_dir, tmp_path_factory.mktemp("sdxl_bank"))


def test_lora_with_both_text_encoders_loads_in_the_stock_sdxl_pipeline(tiny_sdxl_dir, captioned_digits_dir,
                                                                       tmp_path):
    out = tmp_path / "out"
    train(tiny_sdxl_dir, captioned_digits_dir, out, "--train_text_encoder")
    bank = datasets.load_from_disk(str(out / "memory_bank"))
    record = json.loads((out / "memory_bank" / "memory_bank.json").read_text())
    assert len(bank) == 8 and record["family"] == "stable-diffusion-xl" and record["base_model"] == tiny_sdxl_dir
    assert np.asarray(bank[0]["latent_moments"]).shape == (8, 8, 8)  # mean and log-variance of 4 x 8 x 8 latents
    lora = load_file(out / LORA_FILE)
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    prompt = pipe.encode_prompt("a digit three", device="cpu", do_classifier_free_guidance=False)
    pipe.load_lora_weights(out)
    after = pipe.encode_prompt("a digit three", device="cpu", do_classifier_free_guidance=False)
    assert not torch.allclose(prompt[0], after[0]) and not torch.allclose(prompt[2], after[2])  # both encoders
    assert generates(pipe)
    card = ModelCard.load(out / "README.md")
    assert "stable-diffusion-xl" in card.data.tags and "StableDiffusionXLPipeline.from_pretrained" in card.content


@pytest.mark.parametrize("method", ["diff_tuning", "standard", "prior_preservation"])
def test_every_method_with_full_tuning_saves_a_stock_sdxl_pipeline(method, tiny_sdxl_dir, captioned_digits_dir,
                                                                   sdxl_bank, tmp_path):
    train(tiny_sdxl_dir, captioned_digits_dir, tmp_path, *full_tuning_flags(method, sdxl_bank))
    assert full_tuning_changed(tiny_sdxl_dir, tmp_path, "unet", "add_embedding")  # the size/pooled embedding trains
    assert generates(StableDiffusionXLPipeline.from_pretrained(tmp_path))


def test_resume_matches_an_uninterrupted_run(tiny_sdxl_dir, captioned_digits_dir, sdxl_bank, tmp_path, monkeypatch):
    common = ["--memory_bank", sdxl_bank, "--gradient_accumulation_steps", "2", "--train_text_encoder",
              "--random_flip"]
    resume_matches_uninterrupted(lambda out, *more: train(tiny_sdxl_dir, captioned_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, lambda out: load_file(out / LORA_FILE), ["forgetting.json"],
                                 LORA_FILE)


def test_refusals(tiny_sdxl_dir, tiny_sd_dir, captioned_digits_dir, sdxl_bank, tmp_path):
    def error(model, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", model, "--dataset", captioned_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TINY, *extra])

    assert "--crops_coords_top_left_h and --crops_coords_top_left_w go together" in error(
        tiny_sdxl_dir, "--crops_coords_top_left_h", "0")
    assert ("--crops_coords_top_left_w: SDXL's size conditioning (the crop every row's size ids record); this "
            "pipeline is a Stable Diffusion 1.x/2.x pipeline: leave them out") in error(
        tiny_sd_dir, "--crops_coords_top_left_h", "0", "--crops_coords_top_left_w", "0")
    assert "stable-diffusion-xl" in error(tiny_sd_dir, "--memory_bank", sdxl_bank)  # a bank of another family
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_bank_built_ahead_by_generate_memory_bank_is_used(tiny_sdxl_dir, captioned_digits_dir, tmp_path):
    """generate_memory_bank.py builds an SDXL text-to-image bank (its family recorded) that the script then uses
    (SDXL ControlNet banks: tests/test_controlnet_sdxl.py)."""
    from fixtures.testing import bank_built_ahead

    bank, prompts = bank_built_ahead(tiny_sdxl_dir, tmp_path)
    assert datasets.load_from_disk(bank)["text"] == ["a handwritten digit", "a photo of a digit"] * 3
    assert json.loads(open(os.path.join(bank, "memory_bank.json")).read())["family"] == "stable-diffusion-xl"
    train(tiny_sdxl_dir, captioned_digits_dir, tmp_path / "out", "--memory_bank", bank, "--memory_bank_prompts",
          prompts, "--max_train_steps", "2")
    assert not os.path.exists(tmp_path / "out" / "memory_bank")  # the given bank was used, none generated


def test_resolution_defaults_to_the_models_own(tiny_sdxl_dir, captioned_digits_dir, tmp_path):
    """Without --resolution the tiny SDXL trains at its UNet's sample size x the VAE factor (8 x 2 = 16), as an SDXL
    base at 1024: the card and the bank record it."""
    argv = [a for a in TINY if a not in ("--resolution", "16")]
    run_main(script, tiny_sdxl_dir, captioned_digits_dir, tmp_path / "out", *argv, "--max_train_steps", "2")
    assert json.loads((tmp_path / "out" / "memory_bank" / "memory_bank.json").read_text())["resolution"] == 16
    assert "| `resolution` | `16` |" in (tmp_path / "out" / "README.md").read_text()
