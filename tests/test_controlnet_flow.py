"""train_diff_tuning_controlnet.py on tiny SD3 and Flux pipelines (flow matching): SD3ControlNetModel and
FluxControlNetModel copied from the transformer, fed as diffusers' train_controlnet_sd3.py and train_controlnet_flux.py
feed them (the loss written out against the examples' lines); only the ControlNet trains; outputs load in the stock
StableDiffusion3ControlNetPipeline / FluxControlNetPipeline and generate; standard and Diff-Tuning, resume, banks
built ahead, another family's bank and checkpoint refused."""

import contextlib
import json
import os

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import generate_memory_bank
import train_diff_tuning_controlnet as script
from fixtures.in_process import run_script
from fixtures.small_unet import build_flux_pipeline, build_sd3_pipeline
from fixtures.testing import bank_of_a_first_run, cli_error, resume_matches_uninterrupted, run_main
from utils.diffusion.forward_process import FlowMatchingProcess
from utils.families.controlnet import ControlNetOnSD
from utils.families.flux import Flux
from utils.families.sd3 import StableDiffusion3
from utils.methods.diff_tuning import DiffTuning

pytestmark = pytest.mark.beside  # run in the second pytest: balances the two cores (fixtures/beside.py)

TINY = ["--resolution", "16", "--train_batch_size", "4", "--memory_bank_size", "8", "--memory_bank_batch_size", "4",
        "--memory_bank_inference_steps", "2", "--validation_inference_steps", "2", "--num_validation_samples", "4",
        "--num_validation_images", "4", "--validation_steps", "2", "--checkpointing_steps", "2",
        "--report_to", "none", "--learning_rate", "1e-3", "--convergence_threshold", "0.99", "--max_train_steps", "4",
        "--lr_warmup_steps", "0", "--adam_weight_decay", "0", "--max_sequence_length", "16"]
FAMILY_FLAGS = {"sd3": [], "flux": ["--num_double_layers", "1", "--num_single_layers", "1"]}
CLASSES = {"sd3": (SD3ControlNetModel, StableDiffusion3ControlNetPipeline, "stable-diffusion-3", "sd3-diffusers"),
           "flux": (FluxControlNetModel, FluxControlNetPipeline, "flux", "flux-diffusers")}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A two-block SD3 (a new SD3ControlNetModel copies the blocks before the last) and a dev-style Flux."""
    path = tmp_path_factory.mktemp("flow_bases")
    build_sd3_pipeline(str(path / "sd3_src"), num_layers=2).save_pretrained(path / "sd3")
    build_flux_pipeline(str(path / "flux_src")).save_pretrained(path / "flux")
    return {"sd3": str(path / "sd3"), "flux": str(path / "flux")}


def train(kind, bases, data_dir, out, *extra):
    return run_main(script, bases[kind], data_dir, out, *TINY, *FAMILY_FLAGS[kind], *extra)


@pytest.fixture(scope="module")
def banks(bases, control_digits_dir, tmp_path_factory):
    def first_run(kind):
        return lambda model, data, out, *extra: train(kind, bases, data, out, *extra)

    return {kind: bank_of_a_first_run(first_run(kind), bases[kind], control_digits_dir,
                                      tmp_path_factory.mktemp(f"{kind}_cn_bank")) for kind in ("sd3", "flux")}


def one_standard_batch(text, pipe):
    """(family, core, controls, batch): the ControlNet family on `text`, standard training at the examples'
    logit-normal density, and one composed batch of two fixed rows (random images and controls)."""
    family = ControlNetOnSD(text, text.scheduler, pipe.transformer, "a bank prompt", contextlib.nullcontext,
                            torch.float32, 16, "canny")
    controls = torch.rand(2, 3, 16, 16)
    rows = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "conditioning_pixel_values": controls,
            "captions": ["a digit one", "a digit two"]}
    core = DiffTuning(text.scheduler, method="standard", batch_size=2,
                      process=FlowMatchingProcess(text.scheduler, "logit_normal"))
    family.rows = (lambda real: lambda data, generator: real(rows, generator))(family.rows)
    return family, core, controls, core.batch(family, {}, None, torch.Generator().manual_seed(0))


def test_the_sd3_controlnet_loss_is_the_examples(bases):
    """train_controlnet_sd3.py's step written out: the control's latents (z - shift) x scale from the [0, 1] control,
    the ControlNet's block samples into the transformer, the output preconditioned (x - sigma v against x_0)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(bases["sd3"])
    text = StableDiffusion3(pipe, "cpu", max_sequence_length=16)
    controlnet = text.new_controlnet()
    assert controlnet.config.num_layers == 1 and controlnet.config.extra_conditioning_channels == 0
    family, core, controls, b = one_standard_batch(text, pipe)
    config = pipe.vae.config  # the control's latents: (latent_dist.sample() - shift) x scale of the [0, 1] control
    posterior = DiagonalGaussianDistribution(pipe.vae.encode(controls).latent_dist.parameters)
    torch.testing.assert_close(text.control_input(controls, torch.Generator().manual_seed(5)), (posterior.sample(
        torch.Generator().manual_seed(5)) - config.shift_factor) * config.scaling_factor)
    want_control = b.cond["controls"]
    assert want_control.shape == (2, 4, 8, 8) and not torch.allclose(want_control, posterior.mean)  # a draw
    sigmas = text.sigmas(b.timesteps, b.noisy)
    embeds, _, pooled, _ = pipe.encode_prompt(["a digit one", "a digit two"], None, None,
                                              do_classifier_free_guidance=False, max_sequence_length=16)
    blocks = controlnet(hidden_states=b.noisy, timestep=b.timesteps, encoder_hidden_states=embeds,
                        pooled_projections=pooled, controlnet_cond=want_control, return_dict=False)[0]
    pred = pipe.transformer(hidden_states=b.noisy, timestep=b.timesteps, encoder_hidden_states=embeds,
                            pooled_projections=pooled, block_controlnet_hidden_states=blocks, return_dict=False)[0]
    pred = pred * (-sigmas) + b.noisy
    want = ((pred - b.x0) ** 2).reshape(2, -1).mean(1).mean()
    loss, _ = core(family, controlnet, {}, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, want)


def test_the_flux_controlnet_loss_is_the_examples(bases):
    """train_controlnet_flux.py's step written out: the control in [-1, 1] VAE-encoded and packed, the ControlNet's
    double and single block samples into the transformer, guidance 3.5, timestep / 1000, target noise - x_0."""
    pipe = FluxPipeline.from_pretrained(bases["flux"])
    text = Flux(pipe, "cpu", max_sequence_length=16, controlnet_layers=(1, 1))
    controlnet = text.new_controlnet()
    assert (controlnet.config.num_layers, controlnet.config.num_single_layers) == (1, 1)
    family, core, controls, b = one_standard_batch(text, pipe)
    assert family.interpolation == "lanczos"  # train_controlnet_flux.py's default
    config = pipe.vae.config  # the control in [-1, 1] (the example normalises it), VAE-encoded and drawn
    posterior = DiagonalGaussianDistribution(pipe.vae.encode(controls * 2 - 1).latent_dist.parameters)
    torch.testing.assert_close(text.control_input(controls, torch.Generator().manual_seed(5)), (posterior.sample(
        torch.Generator().manual_seed(5)) - config.shift_factor) * config.scaling_factor)
    control = b.cond["controls"]
    embeds, pooled, text_ids = pipe.encode_prompt(["a digit one", "a digit two"], None, max_sequence_length=16)
    n, c, h, w = b.noisy.shape
    ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32)
    common = {"hidden_states": FluxPipeline._pack_latents(b.noisy, n, c, h, w), "timestep": b.timesteps / 1000,
              "guidance": torch.full((n,), 3.5), "pooled_projections": pooled, "encoder_hidden_states": embeds,
              "txt_ids": text_ids, "img_ids": ids}
    blocks, singles = controlnet(**common, controlnet_cond=FluxPipeline._pack_latents(control, n, c, h, w),
                                 return_dict=False)
    pred = pipe.transformer(**common, controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                            return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, h * 2, w * 2, 2)
    want = torch.nn.functional.mse_loss(pred, b.noise - b.x0)
    loss, _ = core(family, controlnet, {}, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["diff_tuning", "standard"])
def test_only_the_controlnet_trains_and_loads_in_the_stock_pipeline(kind, method, bases, banks, control_digits_dir,
                                                                    tmp_path):
    model_class, pipeline_class, family_name, tag = CLASSES[kind]
    base = bases[kind]
    before = load_file(os.path.join(base, "transformer", "diffusion_pytorch_model.safetensors"))
    extra = ["--memory_bank", banks[kind]] if method == "diff_tuning" else ["--method", "standard"]
    controlnet = train(kind, bases, control_digits_dir, tmp_path, *extra)
    after = load_file(os.path.join(base, "transformer", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base on disk is untouched
    family_pipe = (StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline).from_pretrained(base)
    fresh = (Flux(family_pipe, "cpu", controlnet_layers=(1, 1)) if kind == "flux"
             else StableDiffusion3(family_pipe, "cpu")).new_controlnet().state_dict()
    trained = model_class.from_pretrained(tmp_path).state_dict()
    assert set(trained) == set(fresh) and any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    assert isinstance(controlnet, model_class)
    pipe = pipeline_class.from_pretrained(base, controlnet=model_class.from_pretrained(tmp_path))
    control = Image.open(os.path.join(control_digits_dir, "00003_control.png"))
    image = pipe("a digit three", control_image=control, height=16, width=16, num_inference_steps=2,
                 output_type="np", max_sequence_length=16, generator=torch.manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    card = ModelCard.load(tmp_path / "README.md")
    assert tag in card.data.tags and pipeline_class.__name__ in card.text and "control_image=control" in card.text
    curve = json.loads((tmp_path / "convergence.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    if method == "diff_tuning":
        record = json.loads(open(os.path.join(banks[kind], "memory_bank.json")).read())
        assert record["family"] == f"controlnet-{family_name}" and "annotator" in record


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_resume_matches_an_uninterrupted_run(kind, bases, banks, control_digits_dir, tmp_path, monkeypatch):
    model_class = CLASSES[kind][0]
    common = ["--memory_bank", banks[kind], "--gradient_accumulation_steps", "2", "--proportion_empty_prompts", "0.5"]
    resume_matches_uninterrupted(lambda out, *more: train(kind, bases, control_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, lambda out: model_class.from_pretrained(out).state_dict(),
                                 ["convergence.json"])


def test_banks_built_ahead_and_other_families_banks_and_checkpoints(bases, banks, control_digits_dir, tmp_path):
    bank = str(tmp_path / "bank")
    run_script(generate_memory_bank, ["--pretrained_model_name_or_path", bases["flux"], "--output_dir", bank,
                                      "--condition", "canny", "--size", "8", "--resolution", "16",
                                      "--num_inference_steps", "2", "--max_sequence_length", "16"])
    assert json.loads(open(os.path.join(bank, "memory_bank.json")).read())["family"] == "controlnet-flux"
    train("flux", bases, control_digits_dir, tmp_path / "out", "--memory_bank", bank, "--max_train_steps", "2",
          "--validation_steps", "0")
    assert not os.path.exists(tmp_path / "out" / "memory_bank")  # the given bank was used, none generated

    def error(kind, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", bases[kind], "--dataset", control_digits_dir,
                                  "--output_dir", str(tmp_path / "refused"), *TINY, *extra])

    assert "controlnet-flux" in error("sd3", "--memory_bank", bank)
    assert "controlnet-stable-diffusion-3" in error("flux", "--memory_bank", banks["sd3"], *FAMILY_FLAGS["flux"])
    message = error("sd3", "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2"))
    assert "(flux); this run is train_diff_tuning_controlnet.py (stable-diffusion-3)" in message
    assert not (tmp_path / "refused").exists() or not os.listdir(tmp_path / "refused")


def test_refusals(bases, control_digits_dir, tmp_path):
    def error(kind, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", bases[kind], "--dataset", control_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TINY, *extra])

    assert "--num_double_layers: Flux ControlNets'" in error("sd3", "--num_double_layers", "2")
    assert "--precondition_outputs: SD3's" in error("flux", "--precondition_outputs", "1")
    assert "--resolution 18 is not a multiple of 4" in error("flux", "--resolution", "18")
    sd3_controlnet = tmp_path / "sd3_controlnet"
    StableDiffusion3(StableDiffusion3Pipeline.from_pretrained(bases["sd3"]), "cpu").new_controlnet().save_pretrained(
        sd3_controlnet)
    assert "holds a SD3ControlNetModel, not a FluxControlNetModel" in error(
        "flux", "--controlnet_model_name_or_path", str(sd3_controlnet))
    assert "--num_double_layers and --num_single_layers must be >= 0" in error("flux", "--num_single_layers", "-1")
    assert not (tmp_path / "out").exists()


def test_the_flow_process_is_the_schedulers(bases):
    """The ControlNet script's noise scheduler is the base's flow-matching one (no DDPM schedule behind it)."""
    args = script.parse_args(["--pretrained_model_name_or_path", bases["flux"], "--dataset", "d", "--output_dir",
                              "o", *FAMILY_FLAGS["flux"]])
    family, options, scheduler = script.check_pipeline(args)
    assert family is Flux and isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert options["controlnet_layers"] == (1, 1) and options["guidance_scale"] == 3.5
