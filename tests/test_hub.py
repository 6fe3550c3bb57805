import os

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

import train_diff_tuning_dit as script
from fixtures.testing import TOKEN, files_under
from fixtures.testing import train_dit as train
from utils.infra import hub
from utils.infra.errors import UserError


def test_push_uploads_exactly_the_model_and_never_the_token(hub_calls, tiny_pipeline_dir, digits_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny_pipeline_dir, digits_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
          "--report_to", "tensorboard", "--push_to_hub", "--hub_token", TOKEN, "--hub_model_id", "me/dit-digits",
          "--hub_private_repo", "--push_memory_bank")
    assert hub_calls["whoami"].calls == [((), {"token": TOKEN})]  # checked before training

    (model_repo, model_kw), (bank_repo, bank_kw) = hub_calls["create_repo"].calls
    assert model_repo == ("me/dit-digits",) and model_kw["private"] is True and model_kw["token"] == TOKEN
    assert bank_repo == ("me/dit-digits-memory-bank",) and bank_kw["repo_type"] == "dataset"

    (_, upload), (_, bank_upload) = hub_calls["upload_folder"].calls
    assert upload["repo_id"] == "me/dit-digits" and upload["folder_path"] == str(out)
    uploaded = sorted(filter_repo_objects(files_under(out), ignore_patterns=upload["ignore_patterns"]))
    assert uploaded == ["README.md", "model_index.json", "samples.png", "scheduler/scheduler_config.json",
                        "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert any(f.startswith("checkpoint-") for f in files_under(out)) and any(f.startswith("logs/") for f in
                                                                                files_under(out))
    # The memory bank goes to its own dataset repo, with a card and its generation settings.
    (bank, *_), push_kw = hub_calls["dataset_push"].calls[0]
    assert len(bank) == 16 and hub_calls["dataset_push"].calls[0][0][1] == "me/dit-digits-memory-bank"
    (card, *_), card_kw = hub_calls["card_push"].calls[0]
    assert {"diff-tuning", "memory-bank"} <= set(card.data.tags) and card_kw["repo_type"] == "dataset"
    assert bank_upload["allow_patterns"] == ["memory_bank.json"]

    for f in files_under(out):
        with open(out / f, "rb") as fh:
            assert TOKEN.encode() not in fh.read(), f"the token was written to {f}"
    assert TOKEN not in str(card)


def test_missing_token_fails_before_training(monkeypatch, tiny_pipeline_dir, digits_dir, tmp_path):
    monkeypatch.setattr(hub, "get_token", lambda: None)  # no --hub_token, no HF_TOKEN, no cached login
    with pytest.raises(UserError, match="--push_to_hub needs a token"):
        train(tiny_pipeline_dir, digits_dir, tmp_path, "--push_to_hub")
    assert not os.path.exists(tmp_path / "memory_bank") and not os.path.exists(tmp_path / "model_index.json")


def test_unreachable_hub_fails_before_training(tiny_pipeline_dir, digits_dir, tmp_path):
    # HF_HUB_OFFLINE=1 (set for all tests): the real whoami cannot reach the Hub.
    with pytest.raises(UserError, match="could not be reached"):
        train(tiny_pipeline_dir, digits_dir, tmp_path, "--push_to_hub", "--hub_token", TOKEN)
    assert not os.path.exists(tmp_path / "memory_bank")


def test_card_metadata_for_hub_dataset_and_base_license(tmp_path, tiny_pipeline_dir):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a base model\n")
    args = script.parse_args(["--pretrained_model_name_or_path", str(base), "--dataset", "someone/flowers",
                              "--output_dir", str(tmp_path / "out"), "--tuning", "bitfit", "--method", "standard"])
    os.makedirs(args.output_dir)
    from diffusers import DDPMScheduler

    from utils.methods.diff_tuning import DiffTuning

    standard = DiffTuning(DDPMScheduler(), method="standard")
    script.write_card(args, ["rose", "tulip"], standard, 10, 1000, {"loss": 0.5}, "no", args.learning_rate, None, 1000,
                      args.output_dir)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.datasets == ["someone/flowers"] and card.data.license == "cc-by-nc-4.0"
    assert set(card.data.tags) >= {"standard-fine-tuning", "bitfit", "diffusers-training"}
    assert card.data.library_name == "diffusers" and card.data.base_model is None  # a local path is no Hub id
    assert "10 / 1,000 (1.00%)" in card.text and "`learning_rate` | `0.0001`" in card.text


def test_base_model_metadata_is_a_hub_id_or_left_out(tmp_path):
    from utils.infra.hub import hub_base_model

    assert hub_base_model("facebook/DiT-XL-2-256") == "facebook/DiT-XL-2-256"
    snapshot = tmp_path / "hub" / "models--stabilityai--sd-turbo" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_base_model(str(snapshot)) == "stabilityai/sd-turbo"  # a downloaded snapshot keeps its id
    assert hub_base_model(str(tmp_path)) is None  # any other local folder
    assert hub_base_model("not a//valid id") is None
    out = tmp_path / "card"
    out.mkdir()
    hub.save_model_card(str(out), title="t", base_model=str(snapshot), tags=["x"], description="d",
                        hyperparameters={}, usage="u")
    assert ModelCard.load(out / "README.md").data.base_model == "stabilityai/sd-turbo"



def test_a_text_to_image_card_is_diffusers_with_trigger_words_gallery_tags_and_the_pushed_repo(
        hub_calls, tiny_sd_dir, captioned_digits_dir, tmp_path):
    """As diffusers' save_model_card: instance_prompt in the metadata and a "Trigger words" section, the widget
    gallery of the final validation images (image_<i>.png, uploaded), the family's Hub tags, `template:sd-lora`
    and `lora`; the usage line names the repo the push made (the token's user / the folder's name)."""
    import train_diff_tuning_text_to_image as t2i
    from fixtures.testing import TEXT_TO_IMAGE_TINY, run_main

    out = tmp_path / "out"
    run_main(t2i, tiny_sd_dir, captioned_digits_dir, out, *TEXT_TO_IMAGE_TINY, "--method", "standard",
             "--instance_prompt", "a photo of sks digit", "--push_to_hub", "--hub_token", TOKEN)
    assert len(hub_calls["whoami"].calls) == 2  # before training, and for the repo's namespace at the end
    card = ModelCard.load(out / "README.md")
    assert card.data.instance_prompt == "a photo of sks digit" and "## Trigger words" in card.text
    assert {"stable-diffusion", "stable-diffusion-diffusers", "template:sd-lora", "lora", "text-to-image",
            "diffusers", "diffusers-training", "dreambooth"} <= set(card.data.tags)
    assert [w["output"]["url"] for w in card.data.widget] == [f"image_{i}.png" for i in range(4)]
    assert {w["text"] for w in card.data.widget} == {"a photo of sks digit"} and "<Gallery />" in card.text
    assert 'pipe.load_lora_weights("me/out")' in card.text
    (repo, _), = hub_calls["create_repo"].calls
    assert repo == ("me/out",)
    (_, upload), = hub_calls["upload_folder"].calls
    uploaded = set(filter_repo_objects(files_under(out), ignore_patterns=upload["ignore_patterns"]))
    assert {f"image_{i}.png" for i in range(4)} <= uploaded


def test_a_card_not_pushed_names_the_output_folder(tiny_sd_dir, captioned_digits_dir, tmp_path):
    import train_diff_tuning_text_to_image as t2i
    from fixtures.testing import TEXT_TO_IMAGE_TINY, run_main

    out = tmp_path / "runs" / "out"
    run_main(t2i, tiny_sd_dir, captioned_digits_dir, out, *TEXT_TO_IMAGE_TINY, "--method", "standard")
    assert f'pipe.load_lora_weights("{out}")' in (out / "README.md").read_text()
