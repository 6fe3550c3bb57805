"""Flux.1 through the Diff-Tuning core and train_diff_tuning_text_to_image.py: the tiny pipeline from configs, text
encoded as FluxPipeline encodes it, the packed prediction and loss as diffusers' train_dreambooth_lora_flux.py
computes them (guidance embedding for dev, none for schnell), every method with LoRA (the CLIP encoder too) and full
tuning, outputs in the stock FluxPipeline, resume, banks built ahead, and refusals."""

import json
import os

import datasets
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_density_for_timestep_sampling
from huggingface_hub import ModelCard
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.small_unet import build_flux_pipeline
from fixtures.testing import (
    LORA_FILE,
    TEXT_TO_IMAGE_TINY,
    bank_built_ahead,
    bank_of_a_first_run,
    cli_error,
    full_tuning_changed,
    full_tuning_flags,
    generates,
    resume_matches_uninterrupted,
    run_main,
)
from utils.diffusion.forward_process import FlowMatchingProcess
from utils.families.base import Rows
from utils.families.flux import FLUX_LORA_TARGETS, Flux
from utils.methods.diff_tuning import DiffTuning

pytestmark = pytest.mark.beside  # run in the second pytest: balances the two cores (fixtures/beside.py)

TINY = [*TEXT_TO_IMAGE_TINY, "--max_sequence_length", "16"]


def train(model_dir, data_dir, out, *extra):
    return run_main(script, model_dir, data_dir, out, *TINY, *extra)


@pytest.fixture(scope="module")
def flux_bank(tiny_flux_dir, captioned_digits_dir, tmp_path_factory):
    return bank_of_a_first_run(train, tiny_flux_dir, captioned_digits_dir, tmp_path_factory.mktemp("flux_bank"))


def test_the_family_encodes_prompts_as_the_pipeline_does(tiny_flux_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    family = Flux(pipe, "cpu", max_sequence_length=16)
    ids = family.tokenize(["a digit seven", ""])
    assert ids.shape == (2, pipe.tokenizer.model_max_length + 16)
    hidden, pooled = family.embed(ids)
    want_hidden, want_pooled, text_ids = pipe.encode_prompt(["a digit seven", ""], None, max_sequence_length=16)
    torch.testing.assert_close(hidden, want_hidden)
    torch.testing.assert_close(pooled, want_pooled)
    assert pooled.shape == (2, 16) and hidden.shape == (2, 16, 16) and not text_ids.any()
    assert torch.equal(family.empty_ids[0], ids[1])  # the null condition is the encoded empty prompt


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_the_loss_is_the_flux_examples(guidance_embeds, tmp_path):
    """train_dreambooth_lora_flux.py's step, written out: latents (z - shift) x scale, sigma at the drawn index,
    the packed noisy latents with image ids, timestep / 1000, the guidance value for dev (none for schnell), the
    prediction unpacked, target noise - x_0, weighting 1 ("none"); the core's loss is that MSE."""
    pipe = build_flux_pipeline(str(tmp_path), guidance_embeds=guidance_embeds)
    family = Flux(pipe, "cpu", max_sequence_length=16, guidance_scale=2.5)
    scheduler = family.scheduler
    core = DiffTuning(scheduler, method="standard", batch_size=2, process=FlowMatchingProcess(scheduler, "none"))
    torch.testing.assert_close(core.timesteps.adapt.probs.double(), torch.full((1000,), 1e-3, dtype=torch.float64))
    moments = torch.randn(2, 8, 8, 8)
    rows = Rows(moments, {"input_ids": family.tokenize(["a digit one", "a digit two"])})
    family.rows = lambda data, generator: rows
    b = core.batch(family, {}, None, torch.Generator().manual_seed(0))
    config = pipe.vae.config  # the example's latents: (latent_dist.sample() - shift_factor) x scaling_factor
    torch.testing.assert_close(family.x0(moments, torch.Generator().manual_seed(1)), (DiagonalGaussianDistribution(
        moments).sample(torch.Generator().manual_seed(1)) - config.shift_factor) * config.scaling_factor)
    index = torch.stack([(scheduler.timesteps == t).nonzero()[0, 0] for t in b.timesteps])
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    torch.testing.assert_close(b.noisy, (1 - sigma) * b.x0 + sigma * b.noise)
    torch.testing.assert_close(b.target, b.noise - b.x0)
    assert b.loss_weights is None  # weighting "none"

    prompt_embeds, pooled, text_ids = pipe.encode_prompt(["a digit one", "a digit two"], None, max_sequence_length=16)
    n, c, h, w = b.x0.shape
    guidance = torch.tensor([2.5]).expand(n) if guidance_embeds else None
    pred = pipe.transformer(hidden_states=FluxPipeline._pack_latents(b.noisy, n, c, h, w), timestep=b.timesteps / 1000,
                            guidance=guidance, pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                            txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu",
                                                                                             torch.float32),
                            return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, h * 2, w * 2, 2)  # the tiny VAE's factor is 2
    want = ((pred - (b.noise - b.x0)) ** 2).reshape(n, -1).mean(1).mean()
    loss, _ = core(family, pipe.transformer, {}, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, want)
    assert (family.guidance is None) != guidance_embeds


def test_flux_defaults_to_the_examples_weighting_scheme(tiny_flux_dir):
    """No --weighting_scheme: Flux's uniform sigmas ("none", diffusers' Flux script), SD3's logit-normal."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_dir, subfolder="scheduler")
    args = script.parse_args(["--pretrained_model_name_or_path", tiny_flux_dir, "--dataset", "d", "--output_dir", "o",
                              "--method", "standard"])
    flux = DiffTuning.from_args(args, scheduler, 0.0, flow_defaults=Flux.flow_defaults)
    sd3 = DiffTuning.from_args(args, scheduler, 0.0)
    assert flux.process.weighting_scheme == "none" and sd3.process.weighting_scheme == "logit_normal"
    u = compute_density_for_timestep_sampling("none", 100_000, generator=torch.Generator().manual_seed(0))
    drawn = flux.timesteps.adapt.sample(100_000, torch.Generator().manual_seed(0), "cpu")
    assert abs(drawn.float().mean().item() / 1000 - u.mean().item()) < 0.01  # both uniform over the indices
    given = script.parse_args(["--pretrained_model_name_or_path", tiny_flux_dir, "--dataset", "d", "--output_dir",
                               "o", "--weighting_scheme", "mode"])
    assert DiffTuning.from_args(given, scheduler, 0.0, flow_defaults=Flux.flow_defaults).process.weighting_scheme \
        == "mode"


def test_lora_with_the_clip_encoder_loads_in_the_stock_flux_pipeline(tiny_flux_dir, captioned_digits_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_flux_dir, captioned_digits_dir, out, "--train_text_encoder")
    bank = datasets.load_from_disk(str(out / "memory_bank"))
    record = json.loads((out / "memory_bank" / "memory_bank.json").read_text())
    assert len(bank) == 8 and record["family"] == "flux" and record["max_sequence_length"] == 16
    assert record["guidance_scale"] == 3.5  # the family's bank default: the guidance embedding's usual value
    lora = load_file(out / LORA_FILE)
    assert {k.split(".")[0] for k in lora} == {"transformer", "text_encoder"}
    targets = {t for t in FLUX_LORA_TARGETS if any(f".{t}.lora_A" in k for k in lora)}
    assert targets == set(FLUX_LORA_TARGETS)  # every default target of the example has adapters
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in lora)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    before = pipe.encode_prompt("a digit three", None, max_sequence_length=16)
    pipe.load_lora_weights(out)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    saved = {k.removeprefix("transformer."): v for k, v in lora.items() if k.startswith("transformer.")}
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)  # every adapter loads
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    after = pipe.encode_prompt("a digit three", None, max_sequence_length=16)
    assert not torch.allclose(before[1], after[1])  # CLIP's pooled output: the encoder's adapters
    assert torch.equal(before[0], after[0])  # T5's states: no adapters there
    assert generates(pipe)
    card = ModelCard.load(out / "README.md")
    assert {"flux", "flux-diffusers", "lora", "template:sd-lora"} <= set(card.data.tags)
    assert "FluxPipeline.from_pretrained" in card.content


@pytest.mark.parametrize("method", ["diff_tuning", "standard", "prior_preservation"])
def test_every_method_with_full_tuning_saves_a_stock_flux_pipeline(method, tiny_flux_dir, captioned_digits_dir,
                                                                   flux_bank, tmp_path):
    train(tiny_flux_dir, captioned_digits_dir, tmp_path, *full_tuning_flags(method, flux_bank))
    assert full_tuning_changed(tiny_flux_dir, tmp_path, "transformer", "time_text_embed")  # the pooled path trains
    assert generates(FluxPipeline.from_pretrained(tmp_path))


def test_resume_matches_an_uninterrupted_run(tiny_flux_dir, captioned_digits_dir, flux_bank, tmp_path, monkeypatch):
    common = ["--memory_bank", flux_bank, "--gradient_accumulation_steps", "2", "--train_text_encoder",
              "--random_flip", "--weighting_scheme", "logit_normal", "--proportion_empty_prompts", "0.5"]
    resume_matches_uninterrupted(lambda out, *more: train(tiny_flux_dir, captioned_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, lambda out: load_file(out / LORA_FILE), ["forgetting.json"],
                                 LORA_FILE)


def test_refusals(tiny_flux_dir, tiny_sd_dir, tiny_sd3_dir, captioned_digits_dir, flux_bank, tmp_path):
    def error(model, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", model, "--dataset", captioned_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY, *extra])

    assert "error: --resolution 18 is not a multiple of 4" in error(tiny_flux_dir, "--resolution", "18")
    assert "--precondition_outputs: SD3's" in error(tiny_flux_dir, "--precondition_outputs", "1")
    assert "--snr_gamma: an epsilon/v-prediction model's" in error(tiny_flux_dir, "--snr_gamma", "5")
    assert "more than Flux's T5 takes (512 tokens)" in error(tiny_flux_dir, "--max_sequence_length", "600")
    assert "error: --guidance_scale: Flux's guidance embedding" in error(tiny_sd3_dir, "--guidance_scale", "3")
    assert "error: --guidance_scale: Flux's" in error(tiny_sd_dir, "--guidance_scale", "3")
    # another family's bank, both ways
    assert "flux" in error(tiny_sd3_dir, "--memory_bank", flux_bank) and \
        "stable-diffusion-3" in error(tiny_sd3_dir, "--memory_bank", flux_bank)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_checkpoint_of_another_family_is_refused(tiny_flux_dir, tiny_sd3_dir, captioned_digits_dir, flux_bank,
                                                   tmp_path):
    out = tmp_path / "flux"
    train(tiny_flux_dir, captioned_digits_dir, out, "--memory_bank", flux_bank, "--max_train_steps", "2",
          "--validation_steps", "0")
    message = cli_error(script, ["--pretrained_model_name_or_path", tiny_sd3_dir, "--dataset", captioned_digits_dir,
                                 "--output_dir", str(tmp_path / "sd3"), *TINY, "--resume_from_checkpoint",
                                 str(out / "checkpoint-2")])
    assert "(flux); this run is train_diff_tuning_text_to_image.py (stable-diffusion-3)" in message


def test_a_bank_built_ahead_by_generate_memory_bank_is_used(tiny_flux_dir, captioned_digits_dir, tmp_path):
    bank, prompts = bank_built_ahead(tiny_flux_dir, tmp_path, "--max_sequence_length", "16")
    record = json.loads(open(os.path.join(bank, "memory_bank.json")).read())
    assert record["family"] == "flux" and record["max_sequence_length"] == 16
    train(tiny_flux_dir, captioned_digits_dir, tmp_path / "out", "--memory_bank", bank, "--memory_bank_prompts",
          prompts, "--max_train_steps", "2")
    assert not os.path.exists(tmp_path / "out" / "memory_bank")  # the given bank was used, none generated


def test_commands_that_do_not_take_flux_say_which_do(tiny_flux_dir, digits_dir, tmp_path):
    import train_diff_tuning_dit

    message = cli_error(train_diff_tuning_dit, ["--pretrained_model_name_or_path", tiny_flux_dir, "--dataset",
                                                digits_dir, "--output_dir", str(tmp_path / "dit"),
                                                "--max_train_steps", "1"])
    assert "is a FluxPipeline" in message
    assert ("(train_diff_tuning_text_to_image.py, train_diff_tuning_controlnet.py, train_deme.py, check_premise.py "
            "and generate_memory_bank.py take this pipeline)") in message
