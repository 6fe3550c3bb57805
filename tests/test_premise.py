"""check_premise.py: the chain-of-forgetting premise measured on a user's data before training."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import check_premise as script
from fixtures.in_process import run_script
from fixtures.testing import TEST_EXTRACTOR, cli_error, cli_help


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """A small DiT with a trained VAE, pre-trained briefly on MNIST digits (its own data): (model, its data)."""
    import train_diff_tuning_dit
    from fixtures.offline_data import mnist_5k, write_image_folder
    from fixtures.small_dit import build_pipeline, train_vae
    from utils.infra.data import to_tensor

    root = tmp_path_factory.mktemp("premise")
    images, labels, names = mnist_5k()
    order = np.random.default_rng(0).permutation(len(images))[:1200]
    data = write_image_folder(images[order], labels[order], names, str(root / "mnist"))
    pipe = build_pipeline(resolution=16, vae_channels=(16, 32), hidden=(2, 32), layers=4)
    train_vae(pipe.vae, torch.stack([to_tensor(Image.fromarray(i), 16) for i in images[order]]), 200)
    pipe.save_pretrained(root / "init")
    run_script(train_diff_tuning_dit, [
        "--pretrained_model_name_or_path", str(root / "init"), "--dataset", data, "--output_dir", str(root / "dit"),
        "--method", "standard", "--resolution", "16", "--train_batch_size", "64", "--learning_rate", "1e-3",
        "--max_train_steps", "600", "--cache_latents", "--no-random_flip", "--checkpointing_steps", "1000",
        "--validation_steps", "0", "--report_to", "none", "--skip_image_check"])
    return str(root / "dit"), data


@pytest.fixture(scope="module")
def photo_patches(tmp_path_factory):
    """16 px patches of sklearn's two sample photographs: data unrelated to digits."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("patches") / "x"
    folder.mkdir()
    photos, rng = load_sample_images().images, np.random.default_rng(0)
    for i in range(64):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
        Image.fromarray(photo[y:y + 64, x:x + 64]).resize((16, 16), Image.BILINEAR).save(folder / f"{i:03d}.png")
    return str(folder.parent)


def check(model, data, out, *extra):
    return run_script(script, ["--pretrained_model_name_or_path", model, "--dataset", data, "--output_dir", str(out),
                               "--num_images", "32", "--num_inference_steps", "20", "--feature_extractor",
                               TEST_EXTRACTOR, *extra])


def test_premise_holds_on_the_sources_data_and_not_on_unrelated_images(small_source, photo_patches, tmp_path):
    """The default rule: on data of the source's kind the small-t error ratio is near 1 and handing over costs what
    it costs on its own samples; on photographs the small-t error ratio gives it away."""
    model, mnist = small_source
    same = check(model, mnist, tmp_path / "same")
    other = check(model, photo_patches, tmp_path / "other")
    assert same["error_ratio"][0] <= 1.25 < other["error_ratio"][0]
    assert same["premise_holds"] and "premise holds" in same["verdict"], same["verdict"]
    assert not other["premise_holds"] and "worse than its own samples" in other["verdict"]
    written = json.loads((tmp_path / "same" / "premise.json").read_text())
    assert written["premise_holds"] and set(written["handoff_cost"]) == set(written["handoff_cost_own"]) == {"0.1",
                                                                                                         "0.2"}
    assert os.path.getsize(tmp_path / "same" / "premise.png") > 0
    # the rule as written, on the same numbers: a cost 6 points above its own samples' fails, 4 points passes
    args = script.parse_args(["--pretrained_model_name_or_path", model, "--dataset", mnist, "--output_dir",
                              str(tmp_path / "n")])
    own = same["handoff_cost_own"]["0.1"]
    assert not script.verdict(same["error_ratio"], {0.1: own + 0.06}, {0.1: own}, args)[0]
    assert script.verdict(same["error_ratio"], {0.1: own + 0.04}, {0.1: own}, args)[0]


def test_a_larger_hand_off_starts_from_more_noise(small_source):
    """Handing over the last 5% of 20 DDIM steps (one step, from t near 0) returns latents close to the input;
    handing over half starts from far more noise, and returns latents further from it."""
    from diffusers import DDPMScheduler

    from utils.families.dit import DiT

    model, _ = small_source
    pipe = DiT.load(model)
    family = DiT(pipe.transformer, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config), "cpu")
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    null = {"class_labels": torch.full((4,), family.null_class)}
    small = script.hand_off(family, pipe.transformer, latents, null, 0.05, 20, 0, 4)
    large = script.hand_off(family, pipe.transformer, latents, null, 0.5, 20, 0, 4)
    assert (small - latents).abs().mean() < (large - latents).abs().mean()


@pytest.mark.parametrize("extra, message", [
    (["--handoff_fractions", "0"], "--handoff_fractions must lie in (0, 1]"),
    (["--num_images", "0"], "--num_images must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--feature_extractor", "nonsense"], "unknown --feature_extractor"),
])
def test_bad_input_is_refused_before_weights_load(extra, message, tiny_pipeline_dir, digits_dir, tmp_path,
                                                  monkeypatch):
    import utils.families.dit as dit

    monkeypatch.setattr(dit.DiT, "load", lambda *a, **k: pytest.fail("weights loaded"))
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir, "--output_dir",
            str(tmp_path / "out"), *extra]
    assert message in cli_error(script, argv)
    assert not (tmp_path / "out" / "premise.json").exists()


def test_a_pipeline_of_another_family_is_refused(tiny_ddpm_dir, digits_dir, tmp_path):
    message = cli_error(script, ["--pretrained_model_name_or_path", tiny_ddpm_dir, "--dataset", digits_dir,
                                 "--output_dir", str(tmp_path / "out")])
    assert "check_premise.py takes a class-conditional DiTPipeline or a Stable Diffusion" in message
    assert "or a Flux pipeline" in message


def test_help_documents_every_flag():
    text = cli_help(script)
    for flag in ("--handoff_fractions", "--small_t_ratio", "--max_handoff_cost", "--feature_extractor"):
        assert flag in text


def test_the_home_cost_can_come_from_real_images_of_the_source_domain(small_source, tmp_path):
    """--source_dataset: the hand-off cost at home is measured on real images of the model's domain (recorded as
    such), and a set too small for two halves is refused before any weights load."""
    model, mnist = small_source
    report = check(model, mnist, tmp_path / "home", "--source_dataset", mnist, "--handoff_fractions", "0.1")
    assert report["home"] == mnist and set(report["handoff_cost_own"]) == {"0.1"}
    # the same images at home and as the user's: the two costs are measured on the same kind of data
    assert abs(report["handoff_cost"]["0.1"] - report["handoff_cost_own"]["0.1"]) < 0.5
    few = tmp_path / "few" / "x"
    few.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(few / f"{i}.png")
    assert "--source_dataset has 3 image(s); the check needs 64" in cli_error(script, [
        "--pretrained_model_name_or_path", model, "--dataset", mnist, "--output_dir", str(tmp_path / "n"),
        "--num_images", "32", "--source_dataset", str(few.parent)])


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_text_to_image_families_are_checked_with_their_own_samples_and_sampler(kind, tiny_sdxl_dir, tiny_sd3_dir,
                                                                              tiny_flux_dir, digits_dir, tmp_path):
    """A tiny SDXL, SD3 or Flux (random weights): its own prompted samples, the error per noise-level bucket and
    the hand-off on its own schedule, all finite, the report naming the family."""
    model = {"sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[kind]
    report = run_script(script, ["--pretrained_model_name_or_path", model, "--dataset", digits_dir, "--output_dir",
                                 str(tmp_path / "out"), "--num_images", "4", "--num_inference_steps", "4",
                                 "--resolution", "16", "--batch_size", "4", "--feature_extractor", TEST_EXTRACTOR,
                                 "--handoff_fractions", "0.5"])
    assert report["family"] == {"sdxl": "stable-diffusion-xl", "sd3": "stable-diffusion-3", "flux": "flux"}[kind]
    values = [*report["error_on_your_images"], *report["error_on_its_own_samples"], report["fid_your_images"],
              *report["fid_after_handoff"].values()]
    assert len(report["error_ratio"]) == 4 and all(np.isfinite(values))
    assert json.loads((tmp_path / "out" / "premise.json").read_text())["family"] == report["family"]


def test_flow_buckets_count_from_the_data_and_the_hand_off_uses_the_pipelines_schedule(tiny_flux_dir):
    """Under flow matching bucket k is the k-th smallest sigma (scheduler index 0 is the noisiest), and the hand-off
    schedule is FluxPipeline's own (sigmas 1 .. 1/N shifted by mu of the packed sequence length)."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from utils.diffusion.forward_process import forward_process
    from utils.families.flux import Flux

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    family = Flux.from_pipeline(pipe, "cpu")
    process = forward_process(family.scheduler)
    sigma = process.sigmas[process.index_from_data_side(torch.tensor([0, 999]))]
    assert sigma[0] == process.sigmas.min() and sigma[1] == process.sigmas.max()
    scheduler = family.handoff_scheduler(4, (1, 4, 8, 8))
    config = pipe.scheduler.config
    want, _ = retrieve_timesteps(type(pipe.scheduler).from_config(config), 4, "cpu", sigmas=np.linspace(1, 1 / 4, 4),
                                 mu=calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len,
                                                    config.base_shift, config.max_shift))
    torch.testing.assert_close(scheduler.timesteps, want)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    null = family.null_condition(2)
    small = script.hand_off(family, pipe.transformer, latents, null, 0.25, 4, 0, 2)
    large = script.hand_off(family, pipe.transformer, latents, null, 1.0, 4, 0, 2)
    assert small.shape == latents.shape and (small - latents).abs().mean() < (large - latents).abs().mean()
