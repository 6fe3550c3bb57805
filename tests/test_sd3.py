"""Stable Diffusion 3 (flow matching) through the Diff-Tuning core and train_diff_tuning_text_to_image.py: the tiny
pipeline from configs, the forward process the core draws from (timesteps, noisy input, target, loss weights), every
method with LoRA (both CLIP encoders too) and full tuning, outputs in the stock StableDiffusion3Pipeline, resume,
banks built ahead, and refusals."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3
from huggingface_hub import ModelCard
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.small_unet import build_sd3_pipeline
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
from utils.diffusion.forward_process import FlowMatchingProcess, forward_process
from utils.diffusion.timesteps import flow_base_probabilities, flow_matching_weights
from utils.families.base import Rows
from utils.families.sd3 import StableDiffusion3
from utils.methods.diff_tuning import DiffTuning

pytestmark = pytest.mark.beside  # run in the second pytest: balances the two cores (fixtures/beside.py)

TINY = [*TEXT_TO_IMAGE_TINY, "--max_sequence_length", "16"]


def train(model_dir, data_dir, out, *extra):
    return run_main(script, model_dir, data_dir, out, *TINY, *extra)


@pytest.fixture(scope="module")
def sd3_bank(tiny_sd3_dir, captioned_digits_dir, tmp_path_factory):
    return bank_of_a_first_run(train, tiny_sd3_dir, captioned_digits_dir, tmp_path_factory.mktemp("sd3_bank"))


def test_tiny_sd3_builds_saves_loads_and_samples(tmp_path):
    build_sd3_pipeline(str(tmp_path / "src")).save_pretrained(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_3("a digit seven").input_ids[-1] == 1  # the word-level T5 tokenizer ends with eos
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("a digit seven", None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=16)
    assert pooled.shape == (1, 32) and prompt_embeds.shape[-1] == 16  # two CLIP projections; T5 width
    images = pipe("a digit seven", num_inference_steps=2, height=16, width=16, output_type="np",
                  max_sequence_length=16, generator=torch.manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_the_family_encodes_prompts_as_the_pipeline_does(tiny_sd3_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    family = StableDiffusion3(pipe, "cpu", max_sequence_length=16)
    ids = family.tokenize(["a digit seven", ""])
    assert ids.shape == (2, 2 * pipe.tokenizer.model_max_length + 16)
    hidden, pooled = family.embed(ids)
    want_hidden, _, want_pooled, _ = pipe.encode_prompt(["a digit seven", ""], None, None,
                                                        do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(hidden, want_hidden)
    torch.testing.assert_close(pooled, want_pooled)
    assert torch.equal(family.empty_ids[0], ids[1])  # the null condition is the encoded empty prompt


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap"])
def test_the_core_draws_noises_and_weights_as_flow_matching(scheme, tiny_sd3_dir):
    """DiffTuning on a flow-matching scheduler: data rows' indices follow base x psi(sigma), bank rows' base x
    xi(sigma), standard fine-tuning the base alone; the noisy input is (1 - sigma) x_0 + sigma eps, the transformer
    gets scheduler.timesteps[i], the target is noise - x_0, and cosmap weights the per-sample loss."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_dir, subfolder="scheduler")
    process = forward_process(scheduler, weighting_scheme=scheme)
    assert isinstance(process, FlowMatchingProcess)
    sigmas, base = scheduler.sigmas.double(), flow_base_probabilities(1000, scheme)
    core = DiffTuning(scheduler, tau=1.0, batch_size=4, process=process)
    for sampler, role in ((core.timesteps.adapt, "adaptation"), (core.timesteps.retain, "retention")):
        want = flow_matching_weights(sigmas, base, 1.0, role)
        torch.testing.assert_close(sampler.probs.double(), want / want.sum(), atol=1e-7, rtol=1e-5)
    standard = DiffTuning(scheduler, method="standard", batch_size=2, process=process)
    torch.testing.assert_close(standard.timesteps.adapt.probs.double(), base, atol=1e-7, rtol=1e-5)

    family = StableDiffusion3(StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir), "cpu", max_sequence_length=16,
                              precondition_outputs=False)  # the flow target (preconditioning: tests/test_objective.py)
    rows = Rows(torch.randn(2, 8, 8, 8), {"input_ids": family.tokenize(["a digit one", "a digit two"])})
    family.rows = lambda data, generator: rows  # two fixed rows (VAE moments and tokens) instead of a dataset
    b = standard.batch(family, {}, None, torch.Generator().manual_seed(0))
    index = torch.stack([(scheduler.timesteps == t).nonzero()[0, 0] for t in b.timesteps])
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    torch.testing.assert_close(b.noisy, (1 - sigma) * b.x0 + sigma * b.noise)
    torch.testing.assert_close(b.target, b.noise - b.x0)
    expected = compute_loss_weighting_for_sd3(scheme, scheduler.sigmas[index]) if scheme == "cosmap" else None
    assert (b.loss_weights is None) == (expected is None)
    if expected is not None:
        torch.testing.assert_close(b.loss_weights, expected.float())
        assert not torch.allclose(b.loss_weights, torch.ones(2))
    net = family.pipeline.transformer  # the loss the core returns is the weighted mean of the family's per-row loss
    loss, _ = standard(family, net, {}, None, torch.Generator().manual_seed(0))
    per_row = family.loss(net, b)
    torch.testing.assert_close(loss, (per_row * (1 if expected is None else expected.float())).mean())


def test_lora_with_both_clip_encoders_loads_in_the_stock_sd3_pipeline(tiny_sd3_dir, captioned_digits_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_sd3_dir, captioned_digits_dir, out, "--train_text_encoder")
    bank = datasets.load_from_disk(str(out / "memory_bank"))
    record = json.loads((out / "memory_bank" / "memory_bank.json").read_text())
    assert len(bank) == 8 and record["family"] == "stable-diffusion-3" and record["max_sequence_length"] == 16
    assert np.asarray(bank[0]["latent_moments"]).shape == (8, 8, 8)  # mean and log-variance of 4 x 8 x 8 latents
    lora = load_file(out / LORA_FILE)
    assert {k.split(".")[0] for k in lora} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(".attn.add_q_proj." in k for k in lora)  # the joint attention's context projections too
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    before = pipe.encode_prompt("a digit three", None, None, do_classifier_free_guidance=False, max_sequence_length=16)
    pipe.load_lora_weights(out)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    saved = {k.removeprefix("transformer."): v for k, v in lora.items() if k.startswith("transformer.")}
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)  # every adapter loads
    assert any(".attn.to_q." in k for k in saved) and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    after = pipe.encode_prompt("a digit three", None, None, do_classifier_free_guidance=False, max_sequence_length=16)
    assert not torch.allclose(before[2], after[2])  # the pooled projections of the CLIP encoders
    assert not torch.allclose(before[0][:, :-16], after[0][:, :-16])  # their hidden states
    assert torch.equal(before[0][:, -16:], after[0][:, -16:])  # the last 16 rows are T5's: no adapters there
    assert generates(pipe)
    card = ModelCard.load(out / "README.md")
    assert "sd3" in card.data.tags and "StableDiffusion3Pipeline.from_pretrained" in card.content


@pytest.mark.parametrize("method", ["diff_tuning", "standard", "prior_preservation"])
def test_every_method_with_full_tuning_saves_a_stock_sd3_pipeline(method, tiny_sd3_dir, captioned_digits_dir,
                                                                  sd3_bank, tmp_path):
    train(tiny_sd3_dir, captioned_digits_dir, tmp_path, *full_tuning_flags(method, sd3_bank))
    assert full_tuning_changed(tiny_sd3_dir, tmp_path, "transformer", "time_text_embed")  # the pooled path trains
    assert generates(StableDiffusion3Pipeline.from_pretrained(tmp_path))


def test_resume_matches_an_uninterrupted_run(tiny_sd3_dir, captioned_digits_dir, sd3_bank, tmp_path, monkeypatch):
    common = ["--memory_bank", sd3_bank, "--gradient_accumulation_steps", "2", "--train_text_encoder",
              "--random_flip", "--weighting_scheme", "cosmap", "--proportion_empty_prompts", "0.5"]
    resume_matches_uninterrupted(lambda out, *more: train(tiny_sd3_dir, captioned_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, lambda out: load_file(out / LORA_FILE), ["forgetting.json"],
                                 LORA_FILE)


def test_refusals(tiny_sd3_dir, tiny_sd_dir, captioned_digits_dir, sd3_bank, tmp_path):
    def error(model, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", model, "--dataset", captioned_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY, *extra])

    assert "--weighting snr is defined on DDPM's alphas_cumprod" in error(tiny_sd3_dir, "--weighting", "snr")
    assert "error: --weighting_scheme: SD3's" in error(tiny_sd_dir, "--weighting_scheme", "mode")
    assert "error: --max_sequence_length: SD3's" in error(tiny_sd_dir, "--max_sequence_length", "16")
    assert "--logit_std must be > 0" in error(tiny_sd3_dir, "--logit_std", "0")
    assert "--max_sequence_length must be >= 1" in error(tiny_sd3_dir, "--max_sequence_length", "0")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_bank_of_another_family_is_refused(tiny_sd3_dir, tiny_sdxl_dir, captioned_digits_dir, sd3_bank, tmp_path):
    message = cli_error(script, ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset", captioned_digits_dir,
                                 "--output_dir", str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY, "--memory_bank",
                                 sd3_bank])
    assert "stable-diffusion-3" in message and "stable-diffusion-xl" in message


def test_a_bank_built_ahead_by_generate_memory_bank_is_used(tiny_sd3_dir, captioned_digits_dir, tmp_path):
    from fixtures.testing import bank_built_ahead

    bank, prompts = bank_built_ahead(tiny_sd3_dir, tmp_path, "--max_sequence_length", "16")
    record = json.loads(open(os.path.join(bank, "memory_bank.json")).read())
    assert record["family"] == "stable-diffusion-3" and record["max_sequence_length"] == 16
    train(tiny_sd3_dir, captioned_digits_dir, tmp_path / "out", "--memory_bank", bank, "--memory_bank_prompts",
          prompts, "--max_train_steps", "2")
    assert not os.path.exists(tmp_path / "out" / "memory_bank")  # the given bank was used, none generated


def test_the_data_transform_hashes_after_the_pipeline_has_run(tiny_sd3_dir):
    """datasets fingerprints `with_transform`'s function; once a pipeline has run the CLIP encoders they hold
    context variables that do not pickle, so the transform must not close over them (else every run warns)."""
    from datasets.fingerprint import Hasher

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    family = StableDiffusion3(pipe, "cpu", max_sequence_length=16)
    family.inference_pipeline(pipe.transformer, family.text_encoders, family.sampling_scheduler(pipe))(
        "a digit", height=16, width=16, num_inference_steps=1, max_sequence_length=16)
    with pytest.raises(TypeError):
        Hasher.hash(pipe.text_encoder)  # the premise: the encoder itself no longer hashes
    transform = family.transform("image", "text", 16)
    Hasher.hash(transform)
    from PIL import Image

    batch = transform({"image": [Image.new("RGB", (16, 16))], "text": [["a digit one", "one"]]})
    assert torch.equal(batch["input_ids"][0], family.tokenize(["a digit one"])[0])
