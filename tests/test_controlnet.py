"""train_diff_tuning_controlnet.py on a tiny Stable Diffusion (16 px, VAE factor 2) built from configs, offline."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionControlNetPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import train_diff_tuning_controlnet as script
from fixtures.in_process import run_script
from fixtures.testing import (
    ROOT,
    bank_of_a_first_run,
    cli_help,
    killed_at_first_checkpoint,
    resume_matches_uninterrupted,
    run_main,
)
from utils.infra.errors import UserError
from utils.metrics.annotators import make_annotator, normals_from_depth
from utils.metrics.fidelity import ConvergenceTracker, blurred_ssim, fidelity_score

TINY = ["--resolution", "16", "--train_batch_size", "4", "--memory_bank_size", "8", "--memory_bank_batch_size", "4",
        "--memory_bank_inference_steps", "2", "--validation_inference_steps", "2", "--num_validation_samples", "4",
        "--num_validation_images", "4", "--validation_steps", "2", "--checkpointing_steps", "2",
        "--report_to", "none", "--learning_rate", "1e-3", "--convergence_threshold", "0.99",
        "--lr_warmup_steps", "0", "--adam_weight_decay", "0"]  # not the example's 500 and 1e-2: 4 steps must train


def train(sd_dir, data_dir, out, *extra):
    return run_main(script, sd_dir, data_dir, out, *TINY, *extra)


def weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def bank_dir(tiny_sd_dir, control_digits_dir, tmp_path_factory):
    """A finished bank of the tiny SD with Canny controls, made by a first run and reused by the others."""
    return bank_of_a_first_run(train, tiny_sd_dir, control_digits_dir, tmp_path_factory.mktemp("cn_bank"))


@pytest.mark.cli
def test_end_to_end_with_accelerate_launch(tiny_sd_dir, control_digits_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train_diff_tuning_controlnet.py",
         "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset_name", control_digits_dir,
         "--output_dir", str(out), *TINY, "--max_train_steps", "4", "--report_to", "tensorboard"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # A stock ControlNetModel that a stock pipeline samples with.
    controlnet = ControlNetModel.from_pretrained(out)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet, safety_checker=None)
    control = Image.open(os.path.join(control_digits_dir, "00003_control.png"))
    image = pipe("a digit three", image=control, height=16, width=16, num_inference_steps=2, output_type="np",
                 generator=torch.manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    # The curve: step 0 (untrained), then every 2 steps, in convergence.json and a plot.
    curve = json.loads((out / "convergence.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4] and curve["metric"] == "blurred_ssim"
    assert curve["threshold"] == 0.99 and curve["direction"] == "higher"
    assert Image.open(out / "convergence.png").size[0] > 300
    card = ModelCard.load(out / "README.md")  # written without --push_to_hub (diffusers #7080)
    assert {"controlnet", "diff-tuning", "canny"} <= set(card.data.tags) and card.data.base_model is None
    assert "StableDiffusionControlNetPipeline" in card.text and "sudden convergence step" in card.text
    samples = Image.open(out / "samples.png")
    assert samples.size == (4 * 128, 2 * 128)  # 4 held-out controls above their samples, upscaled to be seen
    # Every checkpoint holds a loadable controlnet/ folder.
    ControlNetModel.from_pretrained(out / "checkpoint-2" / "controlnet")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "diff-tuning-controlnet"), size_guidance={"images": 0}).Reload()
    assert "fidelity/blurred_ssim" in events.Tags()["scalars"] and "loss_retain" in events.Tags()["scalars"]
    assert "validation" in events.Tags()["images"]


def test_only_the_controlnet_trains_and_the_embedding_follows_the_vae(tiny_sd_dir, control_digits_dir, bank_dir,
                                                                      tmp_path):
    model = train(tiny_sd_dir, control_digits_dir, tmp_path, "--memory_bank", bank_dir, "--max_train_steps", "3",
                  "--validation_steps", "0")
    # The tiny VAE downsamples 2x: one stride-2 conv in the conditioning embedding, so the control (16 px) lands
    # on the 8 px latents.
    assert tuple(model.config.conditioning_embedding_out_channels) == (16, 32)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    fresh = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).state_dict()
    trained = weights(tmp_path)
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    for part in ("unet", "vae", "text_encoder"):  # frozen: the pipeline's files are untouched and not re-saved
        assert not (tmp_path / part).exists()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_frozen_models_receive_no_gradient(tiny_sd_dir, control_digits_dir, tmp_path, monkeypatch):
    """Inside the loop: after a step, only ControlNet parameters hold gradients or require them."""
    frozen_seen = []
    real_apply = script.training.apply_gradients

    def spy(accelerator, model, loss, *a, **kw):
        import gc

        real_apply(accelerator, model, loss, *a, **kw)
        for obj in gc.get_objects():
            if isinstance(obj, UNet2DConditionModel):
                frozen_seen.append(any(p.requires_grad or p.grad is not None for p in obj.parameters()))

    monkeypatch.setattr(script.training, "apply_gradients", spy)
    train(tiny_sd_dir, control_digits_dir, tmp_path, "--method", "standard", "--max_train_steps", "1",
          "--validation_steps", "0")
    assert frozen_seen and not any(frozen_seen)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_matches_an_uninterrupted_run(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path, monkeypatch,
                                             accumulation):
    common = ["--memory_bank", bank_dir, "--max_train_steps", "4", "--gradient_accumulation_steps", str(accumulation),
              "--use_ema", "--ema_decay", "0.5"]
    resume_matches_uninterrupted(lambda out, *more: train(tiny_sd_dir, control_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, weights, ["convergence.json"])


def test_num_train_epochs_and_epoch_checkpoints(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path):
    """diffusers' --num_train_epochs: 48 rows, batches of 8 data rows (standard), accumulation 2: 3 steps a pass."""
    out = tmp_path / "out"
    train(tiny_sd_dir, control_digits_dir, out, "--method", "standard", "--train_batch_size", "8",
          "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
          "--validation_steps", "0", "--lr_scheduler", "linear")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert "| `steps` | `6` |" in (out / "README.md").read_text()


def test_a_resume_between_evaluations_adds_no_evaluation(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path,
                                                         monkeypatch):
    """Checkpoints at step 3, evaluations every 2: the resumed run's curve is the uninterrupted one's (0, 2, 4),
    without an extra point at the resume step."""
    common = ["--memory_bank", bank_dir, "--max_train_steps", "4", "--checkpointing_steps", "3"]
    train(tiny_sd_dir, control_digits_dir, tmp_path / "full", *common)
    resumed_dir = str(tmp_path / "resumed")
    killed_at_first_checkpoint(monkeypatch, lambda: train(tiny_sd_dir, control_digits_dir, resumed_dir, *common))
    train(tiny_sd_dir, control_digits_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    full = json.loads((tmp_path / "full" / "convergence.json").read_text())
    assert [p["step"] for p in full["points"]] == [0, 2, 4]
    assert full == json.loads((tmp_path / "resumed" / "convergence.json").read_text())


@pytest.mark.cli
def test_two_processes(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path):
    """Data parallel on two CPU processes: the validation is sharded over both and gathered, only rank 0 writes."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_diff_tuning_controlnet.py",
         "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir, "--output_dir", str(out),
         *TINY, "--max_train_steps", "2", "--memory_bank", bank_dir],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((out / "convergence.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2]
    assert not [f for f in os.listdir(out / "checkpoint-2") if "random_states_1" in f]
    ControlNetModel.from_pretrained(out)


def test_bf16_ema_gradient_checkpointing_and_v_prediction(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path):
    vpred = tmp_path / "sd_v"
    shutil.copytree(tiny_sd_dir, vpred)
    config = json.loads((vpred / "scheduler" / "scheduler_config.json").read_text())
    config["prediction_type"] = "v_prediction"
    (vpred / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    model = train(str(vpred), control_digits_dir, tmp_path / "out", "--mixed_precision", "bf16", "--use_ema",
                  "--ema_decay", "0.5", "--gradient_checkpointing", "--max_train_steps", "2")
    assert {w.dtype for w in weights(tmp_path / "out").values()} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_bank_of_another_annotator_setting_is_refused(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path):
    with pytest.raises(UserError, match="was made with annotator = .*'sigma': 1.0.*but this run has.*'sigma': 2.0"):
        train(tiny_sd_dir, control_digits_dir, tmp_path, "--memory_bank", bank_dir, "--canny_sigma", "2")
    with pytest.raises(UserError, match="was made with annotator = .*canny.*sketch"):
        train(tiny_sd_dir, control_digits_dir, tmp_path, "--memory_bank", bank_dir, "--condition", "sketch",
              "--convergence_threshold", "0.9")
    with pytest.raises(UserError, match="was made with resolution = 16"):
        train(tiny_sd_dir, control_digits_dir, tmp_path, "--memory_bank", bank_dir, "--resolution", "32")
    bank = datasets.load_from_disk(bank_dir)
    assert len(bank) == 8 and set(bank["text"]) == {script.DEFAULT_BANK_PROMPT}
    assert bank.features["conditioning_image"] == datasets.Image()


def test_bank_is_deterministic(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from utils.families.controlnet import ControlBankSampler
    from utils.methods.memory_bank import finalize, generate_shards

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    sampler = ControlBankSampler(pipe, make_annotator("canny"), "a prompt", num_inference_steps=2, resolution=16)
    for name, batch in (("a", 2), ("b", 3)):
        generate_shards(sampler, str(tmp_path / name), 5, batch_size=batch, seed=3)
        finalize(str(tmp_path / name), 5, sampler.settings)
    a, b = datasets.load_from_disk(str(tmp_path / "a")), datasets.load_from_disk(str(tmp_path / "b"))
    assert a["seed"] == b["seed"] == [3, 4, 5, 6, 7]
    np.testing.assert_allclose(np.array(a["latent_moments"]), np.array(b["latent_moments"]), atol=1e-5)
    for x, y in zip(a["conditioning_image"], b["conditioning_image"]):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_annotate_dataset_computes_the_control_column(tiny_sd_dir, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    from fixtures.offline_data import sklearn_digits

    images, labels, names = sklearn_digits()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(12):
            Image.fromarray(images[i]).convert("RGB").resize((16, 16), Image.NEAREST).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a digit {names[labels[i]]}"}) + "\n")
    train(tiny_sd_dir, str(folder), tmp_path / "out", "--method", "standard", "--annotate_dataset",
          "--max_train_steps", "1", "--validation_steps", "0")
    assert ControlNetModel.from_pretrained(tmp_path / "out") is not None


# ---- Annotators and metrics.

def square(size=32):
    img = np.zeros((size, size), np.uint8)
    img[8:24, 8:24] = 255
    return Image.fromarray(img).convert("RGB")


def test_canny_finds_the_border_of_a_square_and_sketch_draws_lines():
    edges = make_annotator("canny").measure(square())
    ys, xs = np.nonzero(edges)
    assert edges[16, 16] == 0 and edges[2, 2] == 0  # nothing inside or far outside
    assert 6 <= ys.min() <= 9 and 22 <= ys.max() <= 25 and 6 <= xs.min() <= 9 and 22 <= xs.max() <= 25
    lines = make_annotator("sketch").measure(square())
    assert lines.sum() > 0 and lines[16, 16] == 0 and lines[0, 0] == 0
    assert make_annotator("canny")(square()).mode == "RGB"


def test_depth_normal_and_segmentation_through_transformers(tiny_annotator_models):
    dpt, seg = tiny_annotator_models
    img = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8))
    depth = make_annotator("depth", annotator_model=dpt).measure(img)
    assert depth.shape == (20, 24) and depth.min() == 0 and depth.max() == 1
    normal = make_annotator("normal", annotator_model=dpt)(img)
    assert normal.size == (24, 20)
    labels = make_annotator("segmentation", annotator_model=seg).measure(img)
    assert labels.shape == (20, 24) and set(np.unique(labels)) <= {1, 2, 3}


def test_normal_of_a_planar_depth_is_constant_and_a_flip_negates_x():
    ramp = np.tile(np.linspace(0.2, 1.0, 32), (32, 1))
    normal = normals_from_depth(ramp)
    inner = normal[2:-2, 2:-2]
    assert np.allclose(inner, inner[0, 0], atol=1e-12) and inner[0, 0, 0] != 0.5
    flipped = normals_from_depth(ramp[:, ::-1])[2:-2, 2:-2]
    assert np.allclose(flipped[..., 0] - 0.5, -(inner[..., 0] - 0.5)) and np.allclose(flipped[..., 1:], inner[..., 1:])


def test_metrics_score_identical_maps_perfectly_and_blur_forgives_a_pixel():
    edges = make_annotator("canny").measure(square())
    assert fidelity_score("canny", edges, edges) == pytest.approx(1.0)
    assert fidelity_score("depth", edges, edges) == 0.0
    assert fidelity_score("segmentation", edges.astype(int), edges.astype(int)) == 1.0
    shifted = np.roll(edges, 1, axis=1)
    assert blurred_ssim(edges, shifted, 2.0) > blurred_ssim(edges, shifted, 0.0) + 0.2


def test_tracker_first_crossing_patience_direction_and_resume(tmp_path):
    up = ConvergenceTracker("canny", 0.5, patience=2, path=str(tmp_path / "c.json"))
    for step, score in [(0, 0.2), (100, 0.6), (200, 0.4), (300, 0.55), (400, 0.7), (500, 0.8)]:
        up.add(step, score)
    assert up.converged_at == 300  # 100 passed once only; 300 and 400 are two in a row
    down = ConvergenceTracker("depth", 0.04)
    for step, score in [(0, 0.2), (100, 0.05), (200, 0.03)]:
        down.add(step, score)
    assert down.converged_at == 200 and not down.passes(0.041)
    again = ConvergenceTracker("canny", 0.5, patience=2, path=str(tmp_path / "c.json"))
    again.resume(300)
    assert [p["step"] for p in again.points] == [0, 100, 200, 300] and again.converged_at is None
    with pytest.raises(ValueError):
        up.add(600, float("nan"))
    assert not up.passed_before_training and not json.loads((tmp_path / "c.json").read_text())[
        "threshold_passed_before_training"]
    early = ConvergenceTracker("canny", 0.1, path=str(tmp_path / "early.json"))
    early.add(0, 0.2)  # the untrained model is already past the threshold: recorded, so nobody reads "converged at 0"
    assert early.converged_at == 0 and early.passed_before_training
    assert json.loads((tmp_path / "early.json").read_text())["threshold_passed_before_training"] is True


# ---- Bad input: one line, before any weights load.

def write_folder(path, rows, size=(16, 16), control_size=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for i, row in enumerate(rows):
            Image.new("RGB", size, (i * 20, 0, 0)).save(os.path.join(path, f"{i}.png"))
            Image.new("RGB", control_size or size).save(os.path.join(path, f"{i}_c.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"{i}_c.png", **row}) + "\n")
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing_dataset", "does not exist"),
    ("empty_dataset", "holds no images"),
    ("missing_split", "has no split 'valid'"),
    ("no_caption_column", "has no column 'text' .*its columns: "),
    ("no_control_column", "has no control column 'conditioning_image' .*Pass --annotate_dataset"),
    ("control_of_strings", "holds .*string.*not images. In an image folder, metadata.jsonl rows look like"),
    ("corrupt_control", r"corrupt or unreadable image .*0_c\.png"),
    ("aspect_ratio", "is 16x16 but its control is 16x32: different aspect ratios"),
    ("too_few_rows", "too few to hold out|fewer than one batch"),
    ("not_sd", "is a DDPMPipeline .*takes a Stable Diffusion 1.x/2.x pipeline"),
    ("pixart", "is a PixArtAlphaPipeline .*takes a Stable Diffusion 1.x/2.x pipeline or a Stable Diffusion XL "
               "pipeline or a Stable Diffusion 3 pipeline or a Flux pipeline"),
    ("crops_on_sd", "--crops_coords_top_left_h: SDXL's size conditioning .*; this pipeline is a Stable Diffusion "
                    "1.x/2.x pipeline: leave it out"),
    ("controlnet_mismatch", "does not match the UNet2DConditionModel: block_out_channels"),
    ("resolution", "--resolution 15 is not a multiple of the VAE's factor 2"),
    ("sample_prediction", "predicts 'sample'"),
    ("depth_without_model", "--condition depth needs --annotator_model"),
    ("segmentation_without_model", "--condition segmentation needs --annotator_model"),
    ("annotator_import", "--annotator 'no_such_module:fn' does not import"),
    ("threshold_range", r"--convergence_threshold 1.5 is outside the range of blurred_ssim"),
    ("mse_threshold_range", r"--convergence_threshold -0.1 is outside the range of mse"),
    ("stop_without_validation", "--stop_at_convergence needs the tracker"),
    ("unknown_condition", "invalid choice: 'hed'"),
    ("controlnet_is_a_unet", "holds a UNet2DConditionModel, not a ControlNetModel"),
    ("null_caption", "row 3 of .* has no caption in 'text'"),
    ("annotator_model_missing", "--annotator_model .*no_model' cannot be loaded"),
    ("annotator_model_of_another_task", "is a SegformerForSemanticSegmentation, not a depth-estimation model"),
    ("resume_other_model", "checkpoint .*checkpoint-2 was made with --pretrained_model_name_or_path"),
    ("missing_tokenizer", "--tokenizer_name .*nowhere does not exist"),
    ("missing_variant", "has no weight files of --variant fp16"),
    ("seed", "--seed must be >= 0"),
    ("workers", "--dataloader_num_workers must be >= 0"),
])
def test_bad_input_is_refused_before_weights_load(case, message, tiny_sd_dir, tiny_ddpm_dir, control_digits_dir,
                                                 tiny_annotator_models, tmp_path, monkeypatch, capsys):
    model, data, extra = tiny_sd_dir, control_digits_dir, []
    if case == "missing_dataset":
        data = str(tmp_path / "no" / "such")
    elif case == "empty_dataset":
        data = str(tmp_path / "empty")
        os.makedirs(data)
    elif case == "missing_split":
        extra = ["--train_split", "valid"]
    elif case == "no_caption_column":
        data = write_folder(tmp_path / "d", [{"caption": "x"}] * 8)
    elif case == "no_control_column":
        data = str(tmp_path / "d")
        os.makedirs(data)
        for i in range(8):
            Image.new("RGB", (16, 16)).save(os.path.join(data, f"{i}.png"))
        with open(os.path.join(data, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n" for i in range(8))
    elif case == "control_of_strings":
        data = str(tmp_path / "d")
        datasets.Dataset.from_dict({"image": [Image.new("RGB", (16, 16))] * 8, "conditioning_image": ["a.png"] * 8,
                                    "text": ["x"] * 8}).save_to_disk(data)
    elif case == "corrupt_control":
        data = write_folder(tmp_path / "d", [{"text": "x"}] * 24)
        with open(os.path.join(data, "0_c.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n broken")
    elif case == "aspect_ratio":
        data = write_folder(tmp_path / "d", [{"text": "x"}] * 24, control_size=(16, 32))
    elif case == "too_few_rows":
        data = write_folder(tmp_path / "d", [{"text": "x"}] * 5)
    elif case == "not_sd":
        model = tiny_ddpm_dir
    elif case == "pixart":  # a pipeline of no family here: its index (no weights needed)
        model = str(tmp_path / "pixart")
        os.makedirs(model)
        (tmp_path / "pixart" / "model_index.json").write_text(json.dumps({
            "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "text_encoder": ["transformers", "T5EncoderModel"]}))
    elif case == "crops_on_sd":
        extra = ["--crops_coords_top_left_h", "4"]
    elif case == "controlnet_mismatch":
        from fixtures.small_unet import build_sd_pipeline

        other = build_sd_pipeline(str(tmp_path / "src"))
        unet = UNet2DConditionModel(**{**other.unet.config, "block_out_channels": (16, 32), "norm_num_groups": 8})
        ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "cn")
        extra = ["--controlnet_model_name_or_path", str(tmp_path / "cn")]
    elif case == "resolution":
        extra = ["--resolution", "15"]
    elif case == "annotator_model_missing":
        extra = ["--condition", "depth", "--annotator_model", str(tmp_path / "no_model")]
    elif case == "annotator_model_of_another_task":
        extra = ["--condition", "depth", "--annotator_model", tiny_annotator_models[1]]
    elif case == "null_caption":
        data = write_folder(tmp_path / "d", [{"text": "x"}] * 3 + [{"text": None}] + [{"text": "y"}] * 20)
    elif case == "resume_other_model":
        os.makedirs(tmp_path / "out" / "checkpoint-2")
        (tmp_path / "out" / ".created_by.json").write_text(json.dumps({"script": "train_diff_tuning_controlnet.py"}))
        (tmp_path / "out" / "checkpoint-2" / "training_run.json").write_text(json.dumps(
            {"pretrained_model_name_or_path": "another/model", "method": "diff_tuning"}))
        extra = ["--resume_from_checkpoint", "latest"]
    elif case == "controlnet_is_a_unet":
        extra = ["--controlnet_model_name_or_path", os.path.join(tiny_sd_dir, "unet")]
    elif case == "missing_tokenizer":
        extra = ["--tokenizer_name", str(tmp_path / "nowhere")]
    elif case == "missing_variant":
        extra = ["--variant", "fp16"]
    elif case == "seed":
        extra = ["--seed", "-1"]
    elif case == "workers":
        extra = ["--dataloader_num_workers", "-1"]
    elif case == "sample_prediction":
        model = str(shutil.copytree(tiny_sd_dir, tmp_path / "sd"))
        path = tmp_path / "sd" / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "sample"}))
    elif case == "depth_without_model":
        extra = ["--condition", "depth"]
    elif case == "segmentation_without_model":
        extra = ["--condition", "segmentation"]
    elif case == "annotator_import":
        extra = ["--condition", "custom", "--annotator", "no_such_module:fn", "--convergence_threshold", "0.5"]
    elif case == "threshold_range":
        extra = ["--convergence_threshold", "1.5"]
    elif case == "mse_threshold_range":
        extra = ["--condition", "depth", "--annotator_model", "x", "--convergence_threshold", "-0.1"]
    elif case == "stop_without_validation":
        extra = ["--stop_at_convergence", "--validation_steps", "0"]
    elif case == "unknown_condition":
        extra = ["--condition", "hed"]
    out = tmp_path / "out"

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_weights)  # every pipeline class's loader
    argv = ["--pretrained_model_name_or_path", model, "--dataset", data, "--output_dir", str(out), *TINY, *extra]
    if case == "unknown_condition":  # argparse's own one line
        with pytest.raises(SystemExit):
            script.parse_args(argv)
        assert message.replace("'", "") in capsys.readouterr().err.replace("'", "")
    else:
        with pytest.raises(UserError, match=message):
            run_script(script, argv)
    left = {"memory_bank", "config.json"} | ({"checkpoint-2"} if case != "resume_other_model" else set())
    assert not out.exists() or not left & set(os.listdir(out))


@pytest.mark.cli
def test_a_bad_input_ends_with_one_error_line_and_no_traceback(tiny_sd_dir, control_digits_dir, tmp_path):
    proc = subprocess.run([sys.executable, "train_diff_tuning_controlnet.py", "--pretrained_model_name_or_path",
                           tiny_sd_dir, "--dataset", control_digits_dir, "--output_dir", str(tmp_path / "out"), *TINY,
                           "--condition", "depth"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --condition depth needs --annotator_model")
    assert "requires torchvision" not in proc.stderr  # utils.infra.quiet: no note we cause on purpose


def test_custom_annotator_from_a_file(tiny_sd_dir, control_digits_dir, tmp_path):
    (tmp_path / "my_annotator.py").write_text(
        "from PIL import ImageOps\ndef invert(image):\n    return ImageOps.invert(image.convert('RGB'))\n")
    args = script.parse_args(["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir,
                              "--output_dir", str(tmp_path / "out"), "--condition", "custom", "--annotator",
                              f"{tmp_path / 'my_annotator.py'}:invert", "--convergence_threshold", "0.5"])
    annotator = script.annotator_of(args)
    assert np.asarray(annotator(square()))[16, 16, 0] == 0 and annotator.settings["condition"] == "custom"


def test_help_documents_every_flag():
    text = " ".join(cli_help(script).split())
    for flag in ("--controlnet_model_name_or_path", "--image_column", "--conditioning_image_column",
                 "--caption_column", "--proportion_empty_prompts", "--validation_prompt", "--validation_image",
                 "--num_validation_images", "--set_grads_to_none", "--use_8bit_adam", "--tokenizer_name", "--variant",
                 "--max_train_samples", "--tracker_project_name", "--dataset_name", "--train_data_dir",
                 "--annotate_dataset", "--condition", "--annotator_model", "--memory_bank_prompt",
                 "--convergence_threshold", "--convergence_patience", "--stop_at_convergence",
                 "--fidelity_blur_sigma", "--tau", "--xi_form", "--retention_ratio", "--retention_weight"):
        assert flag in text, flag
    assert "(default: 15000)" in text and "(default: 1e-05)" in text and "(default: 512)" in text


def test_stop_at_convergence_and_extra_validation_grids(tiny_sd_dir, control_digits_dir, bank_dir, tmp_path):
    """A threshold every score passes: converged at step 0, so training ends at the first evaluation after it."""
    control = os.path.join(control_digits_dir, "00007_control.png")
    argv = [*TINY, "--memory_bank", bank_dir, "--max_train_steps", "10", "--convergence_threshold", "-1",
            "--stop_at_convergence", "--validation_prompt", "a digit seven", "--validation_image", control,
            "--num_validation_images", "2"]
    run_script(script, ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", control_digits_dir,
                        "--output_dir", str(tmp_path), *argv, "--report_to", "tensorboard"])
    curve = json.loads((tmp_path / "convergence.json").read_text())
    assert curve["converged_at"] == 0 and [p["step"] for p in curve["points"]] == [0, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "diff-tuning-controlnet"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("validation_prompts")] == [0, 2]  # the prompt grids during training
    assert Image.open(tmp_path / "validation_prompts.png").size == (2 * 128, 2 * 128)  # control above 2 samples
    assert "sudden convergence step | 0 (first of 1 evaluation(s) past -1)" in (tmp_path / "README.md").read_text()


def test_a_custom_annotator_returning_an_array_is_one_clear_line(tmp_path):
    (tmp_path / "arr_annotator.py").write_text("import numpy as np\ndef edges(image):\n    return np.asarray(image)\n")
    annotator = make_annotator("custom", annotator=f"{tmp_path / 'arr_annotator.py'}:edges")
    with pytest.raises(UserError, match="returned a ndarray, not a PIL image"):
        annotator(Image.new("RGB", (8, 8)))
