"""DeMe (train_deme.py, merge_timestep_models.py) on SDXL, SD3 and Flux: each range's copy is a stock UNet or
transformer, the merge (with its weight search) is a stock pipeline that generates, ranges under flow matching cut
the sigmas from the data side, resume is bit-identical, and what a transformer cannot take is refused in one line."""

import os

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

import merge_timestep_models as merge
import train_deme as script
from fixtures.in_process import run_script
from fixtures.testing import cli_error, killed_at_first_checkpoint, run_main
from utils.diffusion.forward_process import forward_process
from utils.families.flux import Flux
from utils.methods.deme import DeMeLoss, RangeTimestepSampler

pytestmark = pytest.mark.beside  # run in the second pytest: balances the two cores (fixtures/beside.py)

TINY = ["--train_batch_size", "4", "--validation_steps", "0", "--num_validation_images", "1",
        "--validation_inference_steps", "2", "--report_to", "none", "--resolution", "16", "--num_ranges", "2",
        "--max_train_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0"]
T5 = ["--max_sequence_length", "16"]  # SD3's and Flux's own flag (SDXL refuses it)
CLASSES = {"sdxl": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}


@pytest.fixture
def bases(tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir):
    return {"sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "flux": tiny_flux_dir}


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_ranges_train_stock_denoisers_that_merge_into_a_stock_pipeline(kind, bases, captioned_digits_dir, tmp_path):
    out, merged = tmp_path / "deme", tmp_path / "merged"
    t5 = T5 if kind != "sdxl" else []
    models = run_main(script, bases[kind], captioned_digits_dir, out, *TINY, *t5)
    base = getattr(DiffusionPipeline.from_pretrained(bases[kind]), "unet" if kind == "sdxl" else "transformer")
    for index in (0, 1):
        tuned = CLASSES[kind].from_pretrained(out / f"range_{index}").state_dict()
        assert any(not torch.equal(v, tuned[k]) for k, v in base.state_dict().items())  # trained
        assert torch.equal(models[index].state_dict()[next(iter(tuned))], tuned[next(iter(tuned))])
    run_script(merge, ["--base_model", bases[kind], "--models", str(out), "--output_dir", str(merged), "--search",
                       "coordinate", "--validation_dataset", captioned_digits_dir, "--validation_batches", "1",
                       "--validation_batch_size", "8", "--grid_values", "0.5", "1", "--search_rounds", "1", *t5])
    pipe = DiffusionPipeline.from_pretrained(merged)
    images = pipe("a digit three", height=16, width=16, num_inference_steps=2, output_type="np",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and (merged / "search_results.json").exists()


def test_flow_ranges_cut_the_sigmas_from_the_data_side(tiny_flux_dir):
    """Range 0 of 2 (no global draws) trains on the smaller half of the sigmas, range 1 on the larger."""
    family = Flux(FluxPipeline.from_pretrained(tiny_flux_dir), "cpu", max_sequence_length=16)
    process = forward_process(family.scheduler)
    median = process.sigmas.median()
    rows = {"pixel_values": [torch.zeros(3, 16, 16, dtype=torch.uint8)] * 64,
            "input_ids": family.tokenize(["a digit"] * 64)}
    for (lo, hi), low in (((0, 500), True), ((500, 1000), False)):
        loss = DeMeLoss(RangeTimestepSampler(1000, lo, hi, global_prob=0.0), consistency_weight=0.0)
        b = loss.batch(family, rows, torch.Generator().manual_seed(0))
        sigma = b.timesteps / 1000  # the model's timesteps are sigma x 1000
        assert bool((sigma <= median).all()) == low and bool((sigma >= median).all()) != low


def test_resume_matches_an_uninterrupted_run(tiny_flux_dir, captioned_digits_dir, tmp_path, monkeypatch):
    common = [*TINY, *T5, "--range_index", "1", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--gradient_accumulation_steps", "2"]
    run_main(script, tiny_flux_dir, captioned_digits_dir, tmp_path / "full", *common)
    killed_at_first_checkpoint(monkeypatch, lambda: run_main(script, tiny_flux_dir, captioned_digits_dir,
                                                             tmp_path / "resumed", *common))
    assert not (tmp_path / "resumed" / "range_1" / "README.md").exists()
    run_main(script, tiny_flux_dir, captioned_digits_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint",
             "latest")
    full = FluxTransformer2DModel.from_pretrained(tmp_path / "full" / "range_1").state_dict()
    resumed = FluxTransformer2DModel.from_pretrained(tmp_path / "resumed" / "range_1").state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_what_a_transformer_cannot_take_is_refused(tiny_sd3_dir, tiny_flux_dir, tiny_sdxl_dir, captioned_digits_dir,
                                                   tmp_path):
    def error(model, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", model, "--dataset", captioned_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TINY, *T5, *extra])

    assert "--channel_projection foldable: DeMe's channel maps go on UNet blocks" in error(
        tiny_sd3_dir, "--channel_projection", "foldable")
    assert "--snr_gamma: an epsilon/v-prediction model's" in error(tiny_flux_dir, "--snr_gamma", "5")
    assert "--resolution 18 is not a multiple of 4" in error(tiny_flux_dir, "--resolution", "18")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    run_main(script, tiny_sd3_dir, captioned_digits_dir, tmp_path / "deme", *TINY, *T5)
    assert "--max_sequence_length: SD3's and Flux's" in cli_error(script, [
        "--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset", captioned_digits_dir, "--output_dir",
        str(tmp_path / "sdxl"), *TINY, *T5])
    assert "--ensemble routes each timestep to its range's model; SD3Transformer2DModel" in cli_error(merge, [
        "--base_model", tiny_sd3_dir, "--models", str(tmp_path / "deme"), "--output_dir", str(tmp_path / "m"),
        "--ensemble"])
