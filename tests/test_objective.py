"""diffusers' objective flags in the text-to-image script, each changing the run as the example's does: SD3's
--precondition_outputs (on by default, as train_dreambooth_lora_sd3.py), Min-SNR --snr_gamma, --noise_offset and
--prediction_type (train_text_to_image_lora.py); a flag of another kind of model is refused in one line."""

import json
import os

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.training_utils import compute_snr
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.testing import TEXT_TO_IMAGE_TINY, cli_error, run_main
from utils.diffusion.forward_process import forward_process
from utils.diffusion.losses import compose_batch
from utils.families.base import Rows
from utils.families.sd3 import StableDiffusion3
from utils.methods.diff_tuning import DiffTuning


def sd3_batch(tiny_sd3_dir, precondition: bool):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    family = StableDiffusion3(pipe, "cpu", max_sequence_length=16, precondition_outputs=precondition)
    process = forward_process(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    cond = {"input_ids": family.tokenize(["a digit one", "a digit two", "a digit three"])}
    return family, compose_batch(process, family, x0, cond, torch.tensor([10, 500, 990]), g), process


@torch.no_grad()
def test_precondition_outputs_is_the_sd3_examples_loss_and_the_flow_loss_times_sigma_squared(tiny_sd3_dir):
    """train_dreambooth_lora_sd3.py: model_pred = model_pred * (-sigmas) + noisy_model_input, target = x_0 with
    --precondition_outputs 1; target = noise - x_0 with 0."""
    on, b_on, process = sd3_batch(tiny_sd3_dir, True)
    off, b_off, _ = sd3_batch(tiny_sd3_dir, False)
    assert torch.equal(b_on.noisy, b_off.noisy) and torch.equal(b_on.target, b_on.x0)
    assert torch.equal(b_off.target, b_off.noise - b_off.x0)
    net = on.pipeline.transformer
    pred = on.predict(net, b_on.noisy, b_on.timesteps, b_on.cond)
    sigmas = process.sigmas[torch.tensor([10, 500, 990])].view(-1, 1, 1, 1)
    example = ((pred.float() * (-sigmas) + b_on.noisy) - b_on.x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(on.loss(net, b_on), example)
    flow = (pred.float() - (b_off.noise - b_off.x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(off.loss(net, b_off), flow)
    torch.testing.assert_close(on.loss(net, b_on), flow * sigmas.flatten() ** 2, rtol=1e-4, atol=1e-6)


def test_the_sd3_default_is_preconditioned_and_zero_turns_it_off(tiny_sd3_dir, tiny_sd_dir):
    args = script.parse_args(["--pretrained_model_name_or_path", tiny_sd3_dir, "--dataset", "x"])
    assert StableDiffusion3.options(args)["precondition_outputs"] is True
    args = script.parse_args(["--pretrained_model_name_or_path", tiny_sd3_dir, "--dataset", "x",
                              "--precondition_outputs", "0"])
    assert StableDiffusion3.options(args)["precondition_outputs"] is False


@torch.no_grad()
def test_snr_gamma_weights_each_sample_as_diffusers_computes_it_on_top_of_the_timestep_density(tiny_sd_dir):
    """Min-SNR: min(SNR, gamma) / SNR per epsilon sample; Diff-Tuning's psi still draws the timesteps, so a
    sample's weight is its density times its Min-SNR weight."""
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    process = forward_process(scheduler, snr_gamma=5.0)
    t = torch.tensor([0, 10, 300, 999])
    snr = compute_snr(scheduler, t)
    torch.testing.assert_close(process.loss_weights(t), torch.stack([snr, 5.0 * torch.ones_like(snr)], 1).min(1)[0]
                               / snr)
    assert forward_process(scheduler).loss_weights(t) is None
    core = DiffTuning(scheduler, method="standard", batch_size=4, process=process)

    class Family:  # rows straight through: x_0 given, the loss per row is known
        device = "cpu"

        def rows(self, data, g):
            return Rows(data["x"], {})

        def drop_condition(self, rows, mask):
            return rows

        def x0(self, x, g):
            return x

        def encode(self, cond):
            return cond

        def target(self, x0, noise, timesteps):
            return noise

        def loss(self, net, b):
            return torch.arange(1.0, 5.0)

    family = Family()
    b = core.batch(family, {"x": torch.zeros(4, 2, 2, 2)}, None, torch.Generator().manual_seed(0))
    loss, _ = core(family, None, {"x": torch.zeros(4, 2, 2, 2)}, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, (torch.arange(1.0, 5.0) * process.loss_weights(b.timesteps)).mean())


def test_noise_offset_adds_a_per_sample_and_channel_shift_from_the_runs_generator(tiny_sd_dir):
    scheduler = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    x0 = torch.zeros(3, 4, 8, 8)
    noise = forward_process(scheduler, noise_offset=0.1).draw_noise(x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(3, 4, 8, 8, generator=g)
    expected = expected + 0.1 * torch.randn(3, 4, 1, 1, generator=g)
    assert torch.equal(noise, expected)
    plain = forward_process(scheduler).draw_noise(x0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)))


def unet(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_each_flag_changes_the_run_and_a_huge_gamma_is_the_plain_loss(tiny_sd_dir, captioned_digits_dir, tmp_path):
    """Full tuning, standard, 4 steps: --snr_gamma 1e9 (weights min(SNR, 1e9) / SNR = 1) trains exactly the plain
    run; --snr_gamma 1, --noise_offset 0.5 and --prediction_type v_prediction each train other weights; the
    v-prediction pipeline's scheduler records its target."""
    runs = {"plain": [], "huge": ["--snr_gamma", "1e9"], "gamma": ["--snr_gamma", "1"],
            "offset": ["--noise_offset", "0.5"], "v": ["--prediction_type", "v_prediction"]}
    weights = {}
    for name, flags in runs.items():
        run_main(script, tiny_sd_dir, captioned_digits_dir, tmp_path / name, *TEXT_TO_IMAGE_TINY, "--method",
                 "standard", "--tuning", "full", "--validation_steps", "0", *flags)
        weights[name] = unet(tmp_path / name)
    same = [torch.equal(weights["plain"][k], weights["huge"][k]) for k in weights["plain"]]
    assert all(same)
    for name in ("gamma", "offset", "v"):
        assert not all(torch.equal(weights["plain"][k], weights[name][k]) for k in weights["plain"]), name
    config = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    card = (tmp_path / "gamma" / "README.md").read_text()
    assert "| `snr_gamma` | `1.0` |" in card


def test_a_flag_of_another_kind_of_model_or_out_of_range_is_refused(tiny_sd_dir, tiny_sd3_dir, captioned_digits_dir,
                                                                   tmp_path):
    def error(model, *extra):
        return cli_error(script, ["--pretrained_model_name_or_path", model, "--dataset", captioned_digits_dir,
                                  "--output_dir", str(tmp_path / "out"), *TEXT_TO_IMAGE_TINY, *extra])

    assert "--snr_gamma: an epsilon/v-prediction model's objective" in error(tiny_sd3_dir, "--snr_gamma", "5")
    assert "--noise_offset: an epsilon/v-prediction" in error(tiny_sd3_dir, "--noise_offset", "0.1")
    assert "--precondition_outputs: SD3's" in error(tiny_sd_dir, "--precondition_outputs", "0")
    assert "--snr_gamma must be > 0" in error(tiny_sd_dir, "--snr_gamma", "0")
    assert "--noise_offset must be >= 0" in error(tiny_sd_dir, "--noise_offset", "-1")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
