"""train_diff_tuning_controlnet.py on a tiny Stable Diffusion XL pipeline: a ControlNet copied from the SDXL UNet,
fed both text encoders, the pooled embedding and the size ids; it loads in the stock
StableDiffusionXLControlNetPipeline and generates; standard and Diff-Tuning, resume, banks built ahead, refusals."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image

import generate_memory_bank
import train_diff_tuning_controlnet as script
from fixtures.in_process import run_script
from fixtures.testing import bank_of_a_first_run, cli_error, resume_matches_uninterrupted, run_main

pytestmark = pytest.mark.beside  # run in the second pytest: balances the two cores (fixtures/beside.py)

TINY = ["--resolution", "16", "--train_batch_size", "4", "--memory_bank_size", "8", "--memory_bank_batch_size", "4",
        "--memory_bank_inference_steps", "2", "--validation_inference_steps", "2", "--num_validation_samples", "4",
        "--num_validation_images", "4", "--validation_steps", "2", "--checkpointing_steps", "2",
        "--report_to", "none", "--learning_rate", "1e-3", "--convergence_threshold", "0.99", "--max_train_steps", "4",
        "--lr_warmup_steps", "0", "--adam_weight_decay", "0"]  # not the example's 500 and 1e-2: 4 steps must train


def train(model_dir, data_dir, out, *extra):
    return run_main(script, model_dir, data_dir, out, *TINY, *extra)


def weights(folder):
    return ControlNetModel.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def sdxl_control_bank(tiny_sdxl_dir, control_digits_dir, tmp_path_factory):
    return bank_of_a_first_run(train, tiny_sdxl_dir, control_digits_dir, tmp_path_factory.mktemp("sdxl_cn_bank"))


@pytest.mark.parametrize("method", ["diff_tuning", "standard"])
def test_the_controlnet_loads_in_the_stock_sdxl_controlnet_pipeline(method, tiny_sdxl_dir, control_digits_dir,
                                                                    sdxl_control_bank, tmp_path):
    extra = ["--memory_bank", sdxl_control_bank] if method == "diff_tuning" else ["--method", "standard"]
    train(tiny_sdxl_dir, control_digits_dir, tmp_path, *extra, "--crops_coords_top_left_h", "2")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    trained = weights(tmp_path)
    fresh = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).state_dict()
    assert set(trained) == set(fresh) and any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    assert any(k.startswith("add_embedding") for k in trained)  # the SDXL pooled-text and size-id embedding
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith("add_embedding"))
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir,
                                                               controlnet=ControlNetModel.from_pretrained(tmp_path))
    control = Image.open(os.path.join(control_digits_dir, "00003_control.png"))
    image = pipe("a digit three", image=control, height=16, width=16, num_inference_steps=2, output_type="np",
                 generator=torch.manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    card = ModelCard.load(tmp_path / "README.md")
    assert "stable-diffusion-xl" in card.data.tags and "StableDiffusionXLControlNetPipeline" in card.text
    curve = json.loads((tmp_path / "convergence.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    if method == "diff_tuning":
        record = json.loads(open(os.path.join(sdxl_control_bank, "memory_bank.json")).read())
        assert record["family"] == "controlnet-stable-diffusion-xl" and "annotator" in record


def test_rows_carry_the_size_ids_and_both_encoders(tiny_sdxl_dir):
    """The family feeds SDXL's added condition: (resolution, resolution, crop top, left, resolution, resolution) for
    every row, the pooled embedding of the second encoder, and the two encoders' states concatenated."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from utils.families.controlnet import ControlNetOnSD
    from utils.families.sdxl import StableDiffusionXL

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    text = StableDiffusionXL(pipe, "cpu", crops_coords_top_left=(2, 3))  # --crops_coords_top_left_h/w 2 3
    family = ControlNetOnSD(text, DDPMScheduler.from_config(pipe.scheduler.config), pipe.unet, "a bank prompt",
                            torch.autocast, torch.float32, 16, "canny")
    batch = {"pixel_values": torch.zeros(2, 3, 16, 16), "conditioning_pixel_values": torch.zeros(2, 3, 16, 16),
             "captions": ["a digit one", ["a digit two", "a two"]]}
    rows = family.rows(batch, torch.Generator().manual_seed(0))
    assert rows.cond["time_ids"].tolist() == [[16, 16, 2, 3, 16, 16]] * 2
    encoded = family.encode(rows.cond)
    hidden, pooled = text.embed(rows.cond["input_ids"])
    torch.testing.assert_close(encoded["encoder_hidden_states"], hidden)
    torch.testing.assert_close(encoded["text_embeds"], pooled)
    bank = family.bank_rows({"latent_moments": torch.zeros(3, 8, 8, 8),
                             "conditioning_pixel_values": torch.zeros(3, 3, 16, 16)}, None)
    assert bank.cond["input_ids"].shape == (3, 2, pipe.tokenizer.model_max_length)
    assert torch.equal(bank.cond["input_ids"][0], text.tokenize(["a bank prompt"])[0])


def test_resume_matches_an_uninterrupted_run(tiny_sdxl_dir, control_digits_dir, sdxl_control_bank, tmp_path,
                                             monkeypatch):
    common = ["--memory_bank", sdxl_control_bank, "--gradient_accumulation_steps", "2", "--proportion_empty_prompts",
              "0.5"]
    resume_matches_uninterrupted(lambda out, *more: train(tiny_sdxl_dir, control_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, weights, ["convergence.json"])


def test_a_bank_built_ahead_is_used_and_other_families_banks_are_refused(tiny_sdxl_dir, tiny_sd_dir,
                                                                         control_digits_dir, tmp_path):
    bank = str(tmp_path / "bank")
    run_script(generate_memory_bank, ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--output_dir", bank,
                                      "--condition", "canny", "--size", "8", "--resolution", "16",
                                      "--num_inference_steps", "2"])
    record = json.loads(open(os.path.join(bank, "memory_bank.json")).read())
    assert record["family"] == "controlnet-stable-diffusion-xl"
    train(tiny_sdxl_dir, control_digits_dir, tmp_path / "out", "--memory_bank", bank, "--max_train_steps", "2",
          "--validation_steps", "0")
    assert not os.path.exists(tmp_path / "out" / "memory_bank")  # the given bank was used, none generated
    message = cli_error(script, ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir,
                                 "--output_dir", str(tmp_path / "sd"), *TINY, "--memory_bank", bank])
    assert "controlnet-stable-diffusion-xl" in message


def test_refusals(tiny_sdxl_dir, tiny_sd3_dir, control_digits_dir, tmp_path):
    def error(model, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", model, "--dataset", control_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TINY, *extra])

    assert ("--tokenizer_name: the one tokenizer of a Stable Diffusion 1.x/2.x pipeline; this pipeline is a Stable "
            "Diffusion XL") in error(tiny_sdxl_dir, "--tokenizer_name", tiny_sdxl_dir)
    assert "its transformer has 1 block(s)" in error(tiny_sd3_dir, "--max_sequence_length", "16")  # nothing to copy
    assert "--crops_coords_top_left_h: SDXL's" in error(tiny_sd3_dir, "--crops_coords_top_left_h", "2")
    assert not (tmp_path / "out").exists()
