"""train_diff_tuning_text_to_image.py on tiny Stable Diffusion pipelines (SD 1.x-style epsilon, SD 2.x-style
v-prediction): every method with LoRA and full tuning, outputs in the stock pipeline, the bank rows' condition and
timesteps, prior preservation against DreamBooth's formula and as a case of Diff-Tuning, resume, two processes,
bad input."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import train_diff_tuning_text_to_image as script
from fixtures.in_process import run_script
from fixtures.testing import (
    LORA_FILE,
    ROOT,
    TEXT_TO_IMAGE_TINY,
    bank_of_a_first_run,
    cli_help,
    generates,
    resume_matches_uninterrupted,
    run_main,
)
from utils.diffusion.timesteps import retention_weights
from utils.families.stable_diffusion import StableDiffusion
from utils.infra.errors import UserError
from utils.methods.diff_tuning import DiffTuning

TINY = TEXT_TO_IMAGE_TINY


def train(sd_dir, data_dir, out, *extra):
    return run_main(script, sd_dir, data_dir, out, *TINY, *extra)


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_sd_v_dir(tmp_path_factory):
    from fixtures.small_unet import build_sd_pipeline

    path = tmp_path_factory.mktemp("tiny_sd_v")
    build_sd_pipeline(str(path / "src"), prediction_type="v_prediction").save_pretrained(path / "pipe")
    return str(path / "pipe")


@pytest.fixture(scope="module")
def t2i_bank(tiny_sd_dir, captioned_digits_dir, tmp_path_factory):
    """A finished bank for the captioned digits (the default prompts: their distinct captions)."""
    return bank_of_a_first_run(train, tiny_sd_dir, captioned_digits_dir, tmp_path_factory.mktemp("t2i_bank"))


@pytest.mark.cli
def test_end_to_end_with_accelerate_launch_lora_loads_in_the_stock_pipeline(tiny_sd_dir, captioned_digits_dir,
                                                                            tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train_diff_tuning_text_to_image.py",
         "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", captioned_digits_dir, "--output_dir", str(out),
         *TINY, "--report_to", "tensorboard", "--train_text_encoder"],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the bank: samples of the pre-trained model for the data's distinct captions, with their prompt
    bank = datasets.load_from_disk(str(out / "memory_bank"))
    assert len(bank) == 8 and set(bank["text"]) <= {f"a digit {n}" for n in
                                                    ("zero one two three four five six seven eight nine".split())}
    lora = load_file(out / LORA_FILE)
    assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500,
                       encoder_hidden_states=torch.zeros(1, 16, 16)).sample
    pipe.load_lora_weights(out)
    after = pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500,
                      encoder_hidden_states=torch.zeros(1, 16, 16)).sample
    assert not torch.allclose(before, after) and generates(pipe)
    card = ModelCard.load(out / "README.md")
    assert {"diff-tuning", "lora", "text-to-image", "diffusers-training"} <= set(card.data.tags)
    assert card.data.library_name == "diffusers" and "load_lora_weights" in card.content
    curve = json.loads((out / "forgetting.json").read_text())
    assert [p["step"] for p in curve["points"]] == [2, 4] and all(0 <= p["ssim_to_base"] <= 1 for p in curve["points"])
    assert (out / "before_after.png").exists() and (out / "samples.png").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = next(os.path.join(d, f) for d, _, fs in os.walk(out / "logs") for f in fs if "tfevents" in f)
    events = EventAccumulator(os.path.dirname(logs), size_guidance={"images": 0}).Reload()
    assert "validation" in events.Tags()["images"] and "forgetting/ssim_to_base" in events.Tags()["scalars"]
    assert "loss_retain" in events.Tags()["scalars"]


@pytest.mark.parametrize("method", ["diff_tuning", "standard", "prior_preservation"])
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_every_method_with_lora_and_full_tuning(method, tuning, tiny_sd_dir, captioned_digits_dir, t2i_bank, tmp_path):
    extra = ["--method", method, "--tuning", tuning]
    if method == "diff_tuning":
        extra += ["--memory_bank", t2i_bank]
    if method == "prior_preservation":
        extra += ["--class_prompt", "a digit", "--train_batch_size", "2"]
    train(tiny_sd_dir, captioned_digits_dir, tmp_path, *extra)
    assert ("memory_bank" in os.listdir(tmp_path)) == (method == "prior_preservation")
    base = unet_weights(tiny_sd_dir)
    if tuning == "lora":
        assert os.listdir(tmp_path).count(LORA_FILE) == 1 and not (tmp_path / "unet").exists()
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        pipe.load_lora_weights(tmp_path)
    else:
        tuned = unet_weights(tmp_path)
        assert set(tuned) == set(base) and any(not torch.equal(base[k], tuned[k]) for k in base)
        vae = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(v, w) for v, w in zip(vae.values(), load_file(
            os.path.join(tiny_sd_dir, "vae", "diffusion_pytorch_model.safetensors")).values()))
        pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert generates(pipe)
    tags = set(ModelCard.load(tmp_path / "README.md").data.tags)
    assert {"diff_tuning": "diff-tuning", "standard": "standard-fine-tuning",
            "prior_preservation": "dreambooth"}[method] in tags


def sd_family(sd_dir, bank_condition="empty", dropout_ids=False):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe, scheduler, StableDiffusion(pipe, "cpu", bank_condition=bank_condition)


def rows(family, g, n=2):
    return ({"pixel_values": list((torch.rand(n, 3, 16, 16, generator=g) * 255).to(torch.uint8)),
             "input_ids": family.tokenize(["a digit one", "a digit two"][:n])},
            {"latent_moments": torch.randn(n, 8, 8, 8, generator=g),
             "input_ids": family.tokenize(["a bank prompt", "another prompt"][:n])})


@pytest.mark.parametrize("condition", ["empty", "prompt"])
def test_bank_rows_carry_the_empty_prompt_or_their_own_and_xi_timesteps(condition, tiny_sd_dir):
    pipe, scheduler, family = sd_family(tiny_sd_dir, condition)
    core = DiffTuning(scheduler, batch_size=4, condition_dropout=0.0)
    xi, bank_t = retention_weights(1000, 1.0), []
    for step in range(30):
        data, bank = rows(family, torch.Generator().manual_seed(step))
        b = core.batch(family, data, bank, torch.Generator().manual_seed(step))
        expected = family.empty_ids.expand(2, -1) if condition == "empty" else bank["input_ids"]
        hidden = pipe.text_encoder(expected)[0]
        torch.testing.assert_close(b.cond["encoder_hidden_states"][:2], hidden)
        torch.testing.assert_close(b.cond["encoder_hidden_states"][2:], pipe.text_encoder(data["input_ids"])[0])
        assert (xi[b.timesteps[:2]] > 0).all()
        bank_t.append(b.timesteps[:2])
    assert torch.cat(bank_t).float().mean() < 450  # xi favours small t (mean T/3)


def test_v_prediction_target_and_training(tiny_sd_v_dir, captioned_digits_dir, tmp_path):
    pipe, scheduler, family = sd_family(tiny_sd_v_dir)
    core = DiffTuning(scheduler, batch_size=4)
    data, bank = rows(family, torch.Generator().manual_seed(0))
    b = core.batch(family, data, bank, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.target, scheduler.get_velocity(b.x0, b.noise, b.timesteps))
    train(tiny_sd_v_dir, captioned_digits_dir, tmp_path, "--tuning", "full", "--mixed_precision", "bf16",
          "--use_ema", "--ema_decay", "0.5", "--gradient_checkpointing")
    assert {w.dtype for w in unet_weights(tmp_path).values()} == {torch.float32}
    assert generates(StableDiffusionPipeline.from_pretrained(tmp_path))


def test_prior_preservation_loss_is_dreamboths_formula(tiny_sd_dir):
    """DreamBooth (diffusers' train_dreambooth.py): pred and target chunked into instance and class halves;
    loss = mse(instance) + prior_loss_weight * mse(prior). Here bank (class) rows come first."""
    pipe, scheduler, family = sd_family(tiny_sd_dir, "prompt")
    core = DiffTuning(scheduler, method="prior_preservation", batch_size=2, retention_weight=0.7)
    assert core.n_bank == core.n_data == 2
    data, bank = rows(family, torch.Generator().manual_seed(3))
    loss, parts = core(family, pipe.unet, data, bank, torch.Generator().manual_seed(3))
    b = core.batch(family, data, bank, torch.Generator().manual_seed(3))
    pred = pipe.unet(b.noisy, b.timesteps, encoder_hidden_states=b.cond["encoder_hidden_states"]).sample
    model_pred_prior, model_pred = torch.chunk(pred, 2, dim=0)
    target_prior, target = torch.chunk(b.target, 2, dim=0)
    by_hand = F.mse_loss(model_pred.float(), target.float(), reduction="mean") + 0.7 * F.mse_loss(
        model_pred_prior.float(), target_prior.float(), reduction="mean")
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(parts["loss_retain"], F.mse_loss(model_pred_prior, target_prior))


def test_diff_tuning_with_the_documented_flags_is_exactly_prior_preservation(tiny_sd_dir, captioned_digits_dir,
                                                                             tmp_path):
    """--train_batch_size counts data rows for every method: at 0.5 Diff-Tuning adds as many bank rows as
    DreamBooth adds class rows."""
    (tmp_path / "prompts.txt").write_text("a digit\n")
    common = ["--memory_bank_size", "8", "--num_class_images", "8", "--retention_weight", "0.5"]
    train(tiny_sd_dir, captioned_digits_dir, tmp_path / "pp", *common, "--with_prior_preservation",
          "--class_prompt", "a digit", "--train_batch_size", "2")
    train(tiny_sd_dir, captioned_digits_dir, tmp_path / "dt", *common, "--method", "diff_tuning", "--tau", "0",
          "--xi_form", "official", "--bank_condition", "prompt", "--retention_ratio", "0.5",
          "--memory_bank_prompts", str(tmp_path / "prompts.txt"), "--train_batch_size", "2")  # the same batch
    pp, dt = load_file(tmp_path / "pp" / LORA_FILE), load_file(tmp_path / "dt" / LORA_FILE)
    assert set(pp) == set(dt) and all(torch.equal(pp[k], dt[k]) for k in pp)


def test_dreambooth_instance_folder_with_an_instance_prompt(tiny_sd_dir, tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(folder / f"{i}.png")
    run_script(script, ["--pretrained_model_name_or_path", tiny_sd_dir, "--instance_data_dir", str(folder),
                        "--instance_prompt", "a photo of sks square", "--output_dir", str(tmp_path / "out"), *TINY,
                        "--with_prior_preservation", "--class_prompt", "a photo of a square", "--prior_loss_weight",
                        "1.0", "--train_batch_size", "2"])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "dreambooth" in card.data.tags and "a photo of sks square" in card.content
    assert set(datasets.load_from_disk(str(tmp_path / "out" / "memory_bank"))["text"]) == {"a photo of a square"}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_matches_an_uninterrupted_run(tiny_sd_dir, captioned_digits_dir, t2i_bank, tmp_path, monkeypatch,
                                             accumulation):
    common = ["--memory_bank", t2i_bank, "--gradient_accumulation_steps", str(accumulation), "--train_text_encoder"]
    resume_matches_uninterrupted(lambda out, *more: train(tiny_sd_dir, captioned_digits_dir, out, *common, *more),
                                 tmp_path, monkeypatch, lambda out: load_file(out / LORA_FILE), ["forgetting.json"],
                                 LORA_FILE)


@pytest.mark.cli
def test_two_processes(tiny_sd_dir, captioned_digits_dir, t2i_bank, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_diff_tuning_text_to_image.py",
         "--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", captioned_digits_dir, "--output_dir", str(out),
         *TINY, "--max_train_steps", "2", "--memory_bank", t2i_bank, "--train_text_encoder"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(out)
    assert generates(pipe) and not [f for f in os.listdir(out / "checkpoint-2") if "random_states_1" in f]


@pytest.mark.parametrize("case,message", [
    ("no_captions", "has no captions .* pass --caption_column, or --instance_prompt"),
    ("prior_without_class_prompt", "prior preservation needs --class_prompt"),
    ("pixart", "is a PixArtAlphaPipeline .*takes a Stable Diffusion 1.x/2.x pipeline or a Stable Diffusion XL "
               "pipeline or a Stable Diffusion 3 pipeline or a Flux pipeline"),
    ("dit", "is a DiTPipeline .*takes a Stable Diffusion 1.x/2.x pipeline"),
    ("rank_zero", "--rank must be >= 1"),
    ("bank_of_another_model", "was made with base_model"),
    ("bank_of_another_resolution", "was made with resolution = 16, but this run has 32"),
    ("bank_of_other_prompts", "was made with prompts = "),
    ("empty_prompt_file", "holds no prompt"),
    ("text_encoder_with_full", "--train_text_encoder trains LoRA adapters"),
    ("null_caption", "row 1 of .* has no caption"),
    ("missing_variant", "has no weight files of --variant fp16"),
])
def test_bad_input_is_refused_before_weights_load(case, message, tiny_sd_dir, tiny_pipeline_dir, captioned_digits_dir,
                                                  t2i_bank, tmp_path, monkeypatch):
    model, data, extra = tiny_sd_dir, captioned_digits_dir, []
    if case == "no_captions":
        data = str(tmp_path / "plain")
        os.makedirs(data)
        Image.new("RGB", (16, 16)).save(os.path.join(data, "a.png"))
        Image.new("RGB", (16, 16)).save(os.path.join(data, "b.png"))
        extra = ["--train_batch_size", "2", "--method", "standard"]
    elif case == "prior_without_class_prompt":
        extra = ["--with_prior_preservation"]
    elif case == "pixart":  # a pipeline of no family here: its index (no weights needed)
        model = str(tmp_path / "pixart")
        os.makedirs(model)
        with open(os.path.join(model, "model_index.json"), "w") as f:
            json.dump({"_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1",
                       "transformer": ["diffusers", "PixArtTransformer2DModel"],
                       "text_encoder": ["transformers", "T5EncoderModel"]}, f)
    elif case == "dit":
        model = tiny_pipeline_dir
    elif case == "rank_zero":
        extra = ["--rank", "0"]
    elif case == "bank_of_another_model":
        other = tmp_path / "other"
        shutil.copytree(tiny_sd_dir, other)
        model, extra = str(other), ["--memory_bank", t2i_bank]
    elif case == "bank_of_another_resolution":
        extra = ["--memory_bank", t2i_bank, "--resolution", "32"]
    elif case == "bank_of_other_prompts":
        extra = ["--memory_bank", t2i_bank, "--class_prompt", "a digit"]
    elif case == "empty_prompt_file":
        (tmp_path / "p.txt").write_text("\n  \n")
        extra = ["--memory_bank_prompts", str(tmp_path / "p.txt")]
    elif case == "text_encoder_with_full":
        extra = ["--tuning", "full", "--train_text_encoder"]
    elif case == "missing_variant":
        extra = ["--variant", "fp16"]
    elif case == "null_caption":
        data = str(tmp_path / "null")
        datasets.Dataset.from_dict({"image": [Image.new("RGB", (16, 16))] * 4, "text": ["a", None, "c", "d"]},
                                   features=datasets.Features({"image": datasets.Image(),
                                                               "text": datasets.Value("string")})).save_to_disk(data)

    def no_weights(*a, **kw):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", no_weights)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_script(script, ["--pretrained_model_name_or_path", model, "--dataset", data, "--output_dir", str(out),
                            *TINY, *extra])
    assert not out.exists() or not {"memory_bank", LORA_FILE, "checkpoint-2"} & set(os.listdir(out))


@pytest.mark.cli
def test_a_bad_input_ends_with_one_error_line_and_no_traceback(tiny_sd_dir, captioned_digits_dir, tmp_path):
    proc = subprocess.run([sys.executable, "train_diff_tuning_text_to_image.py", "--pretrained_model_name_or_path",
                           tiny_sd_dir, "--dataset", captioned_digits_dir, "--output_dir", str(tmp_path / "out"),
                           *TINY, "--with_prior_preservation"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: prior preservation needs --class_prompt")
    assert "requires torchvision" not in proc.stderr  # utils.infra.quiet: no note we cause on purpose


def test_help_documents_every_flag():
    text = " ".join(cli_help(script).split())
    for flag in ("--instance_data_dir", "--instance_prompt", "--class_data_dir", "--class_prompt",
                 "--num_class_images", "--with_prior_preservation", "--prior_loss_weight", "--validation_prompt",
                 "--num_validation_images", "--rank", "--caption_column", "--memory_bank_prompts", "--bank_condition",
                 "--retention_prompts", "--train_text_encoder", "--tuning", "--use_8bit_adam", "--tau", "--xi_form"):
        assert flag in text
    assert "(default: lora)" in text and "(default: 4)" in text
    assert "--tau 0 --xi_form official --bank_condition prompt" in " ".join(script.__doc__.split())


def test_a_bank_built_ahead_by_generate_memory_bank_is_used(tiny_sd_dir, captioned_digits_dir, tmp_path):
    from fixtures.testing import bank_built_ahead

    bank, prompts = bank_built_ahead(tiny_sd_dir, tmp_path)
    assert datasets.load_from_disk(bank)["text"] == ["a handwritten digit", "a photo of a digit"] * 3
    train(tiny_sd_dir, captioned_digits_dir, tmp_path / "out", "--memory_bank", bank, "--memory_bank_prompts",
          prompts, "--max_train_steps", "2")
    assert not os.path.exists(tmp_path / "out" / "memory_bank")  # the given bank was used, none generated
    with pytest.raises(UserError, match="was made with prompts"):  # the run's prompts differ from the bank's
        train(tiny_sd_dir, captioned_digits_dir, tmp_path / "out2", "--memory_bank", bank)


def test_push_uploads_the_lora_weights_and_card_never_the_bank_or_the_token(hub_calls, tiny_sd_dir,
                                                                             captioned_digits_dir, t2i_bank, tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from fixtures.testing import TOKEN, files_under

    out = tmp_path / "out"
    train(tiny_sd_dir, captioned_digits_dir, out, "--memory_bank", t2i_bank, "--max_train_steps", "2",
          "--push_to_hub", "--hub_token", TOKEN, "--hub_model_id", "me/sd-lora")
    assert hub_calls["whoami"].calls == [((), {"token": TOKEN})]  # checked before training
    (_, upload), = hub_calls["upload_folder"].calls
    uploaded = sorted(filter_repo_objects(files_under(out), ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == ["README.md", "before_after.png", "forgetting.json", "forgetting.png",
                        *[f"image_{i}.png" for i in range(4)], LORA_FILE, "samples.png"]  # images: the card's gallery
    assert 'load_lora_weights("me/sd-lora")' in (out / "README.md").read_text()
    for f in files_under(out):
        with open(out / f, "rb") as fh:
            assert TOKEN.encode() not in fh.read(), f"the token was written to {f}"



def test_a_plain_folder_of_class_images_is_dreambooths_class_data_dir(tiny_sd_dir, captioned_digits_dir, tmp_path):
    """DreamBooth's --class_data_dir: its images become the bank's first rows (resized and centre-cropped), the rest
    up to --num_class_images is generated; the bank goes to the output folder and the user's folder is untouched.
    With enough images nothing is generated."""
    import numpy as np

    from utils.infra.image_transforms import resize_center_crop

    folder = tmp_path / "class_images"
    folder.mkdir()
    for i, size in enumerate([(23, 16), (16, 30), (20, 20)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * (i + 1), np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    train(tiny_sd_dir, captioned_digits_dir, tmp_path / "pp", "--with_prior_preservation", "--class_prompt",
          "a digit", "--class_data_dir", str(folder), "--num_class_images", "5", "--train_batch_size", "2")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before and not (tmp_path / "class_images.partial"
                                                                                        ).exists()
    bank = datasets.load_from_disk(str(tmp_path / "pp" / "memory_bank"))
    assert len(bank) == 5 and set(bank["text"]) == {"a digit"}
    for i in range(3):
        expected = resize_center_crop(Image.open(folder / f"{i}.png").convert("RGB"), 16, "lanczos")
        assert np.array_equal(np.asarray(bank[i]["image"]), np.asarray(expected))
    record = json.loads((tmp_path / "pp" / "memory_bank" / "memory_bank.json").read_text())
    assert [os.path.basename(f) for f in record["class_images"]] == ["0.png", "1.png", "2.png"]
    assert "3 class images of" in (tmp_path / "pp" / "README.md").read_text()

    train(tiny_sd_dir, captioned_digits_dir, tmp_path / "enough", "--with_prior_preservation", "--class_prompt",
          "a digit", "--class_data_dir", str(folder), "--num_class_images", "3", "--train_batch_size", "2")
    enough = datasets.load_from_disk(str(tmp_path / "enough" / "memory_bank"))
    assert [np.asarray(row["image"]).tolist() for row in enough] == [np.asarray(row["image"]).tolist()
                                                                    for row in bank.select(range(3))]


def test_a_class_data_dir_without_images_is_refused(tiny_sd_dir, captioned_digits_dir, tmp_path):
    from fixtures.testing import cli_error

    folder = tmp_path / "empty_of_images"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    message = cli_error(script, ["--pretrained_model_name_or_path", tiny_sd_dir, "--dataset", captioned_digits_dir,
                                 "--output_dir", str(tmp_path / "out"), *TINY, "--with_prior_preservation",
                                 "--class_prompt", "a digit", "--class_data_dir", str(folder)])
    assert "--class_data_dir" in message and "holds no images" in message
