"""pytest fixtures: tiny pipelines built from configs and offline image folders; nothing here touches the network.
Helpers live in fixtures.testing."""

import os
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fixtures import beside, testing  # noqa: E402
from fixtures.in_process import run_script  # noqa: E402
from fixtures.offline_data import sklearn_digits, write_image_folder  # noqa: E402
from fixtures.small_dit import build_pipeline  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", f"{beside.MARK}: runs a command line in new processes (a second pytest runs "
                                       "these beside the others; fixtures/beside.py)")
    config.addinivalue_line("markers", f"{beside.BALANCE}: in-process tests the second pytest runs too, so that both "
                                       "sessions take about as long (fixtures/beside.py)")
    if os.environ.get(beside.REPORT_ENV):
        config.pluginmanager.register(beside.Recorder(os.environ[beside.REPORT_ENV]))


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    beside.move_beside(config, items)


def pytest_terminal_summary(terminalreporter, config):
    if beside.SECOND in config.stash:
        config.stash[beside.SECOND].summary(terminalreporter, config.option.durations is not None)


def pytest_unconfigure(config):
    if beside.SECOND in config.stash:
        config.stash[beside.SECOND].stop()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dit")
    build_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """sklearn digits as PNGs in class folders (the first 160)."""
    return write_image_folder(*sklearn_digits(), str(tmp_path_factory.mktemp("digits")), limit=160)


@pytest.fixture(scope="session")
def tiny_bank_dir(tiny_pipeline_dir, tmp_path_factory):
    """A memory bank of the tiny pipeline, built once with the standalone entry point."""
    path = str(tmp_path_factory.mktemp("bank") / "bank")
    import generate_memory_bank

    run_script(generate_memory_bank, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--output_dir", path,
                                      "--size", "16", "--batch_size", "8", "--num_inference_steps", "4"])
    return path


@pytest.fixture(scope="session")
def tiny_ddpm_dir(tmp_path_factory):
    from fixtures.small_unet import build_ddpm_pipeline

    path = tmp_path_factory.mktemp("tiny_ddpm")
    build_ddpm_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from fixtures.small_unet import build_sd_pipeline

    path = tmp_path_factory.mktemp("tiny_sd")
    build_sd_pipeline(str(path / "src")).save_pretrained(path / "pipe")
    return str(path / "pipe")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from fixtures.small_unet import build_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny_sdxl")
    build_sdxl_pipeline(str(path / "src")).save_pretrained(path / "pipe")
    return str(path / "pipe")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from fixtures.small_unet import build_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny_sd3")
    build_sd3_pipeline(str(path / "src")).save_pretrained(path / "pipe")
    return str(path / "pipe")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from fixtures.small_unet import build_flux_pipeline

    path = tmp_path_factory.mktemp("tiny_flux")
    build_flux_pipeline(str(path / "src")).save_pretrained(path / "pipe")
    return str(path / "pipe")


@pytest.fixture(scope="session")
def captioned_digits_dir(tmp_path_factory):
    """64 sklearn digits as an image folder with a metadata.jsonl `text` caption each ("a digit seven")."""
    import json

    from PIL import Image

    images, labels, names = sklearn_digits()
    path = tmp_path_factory.mktemp("captioned")
    with open(path / "metadata.jsonl", "w") as f:
        for i in range(64):
            Image.fromarray(images[i]).convert("RGB").save(path / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"a digit {names[labels[i]]}"}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def control_digits_dir(tmp_path_factory):
    """48 sklearn digits at 16 px in diffusers' ControlNet layout: image, Canny control, caption "a digit seven"."""
    from fixtures.offline_data import write_control_folder
    from utils.metrics.annotators import make_annotator

    return write_control_folder(*sklearn_digits(), str(tmp_path_factory.mktemp("control_digits")),
                                make_annotator("canny"), limit=48)


@pytest.fixture(scope="session")
def tiny_annotator_models(tmp_path_factory):
    """Tiny random transformers models saved to folders: a DPT depth estimator and a SegFormer segmenter."""
    from transformers import (
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    root = tmp_path_factory.mktemp("annotators")
    torch.manual_seed(0)
    DPTForDepthEstimation(DPTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 16], fusion_hidden_size=16, reassemble_factors=[4, 2],
        head_in_index=-1)).save_pretrained(root / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dpt")
    SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3,
        id2label={0: "sky", 1: "tree", 2: "road"}, label2id={"sky": 0, "tree": 1, "road": 2})).save_pretrained(
        root / "seg")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "seg")
    return str(root / "dpt"), str(root / "seg")


@pytest.fixture
def hub_calls(monkeypatch):
    """The Hub client functions replaced by recorders: a push test sees what would be sent, and nothing is."""

    class Repo:
        def __init__(self, repo_id, **_):
            self.repo_id = repo_id

    import datasets
    from huggingface_hub import DatasetCard

    from utils.infra import hub

    record = testing.Recorder
    calls = {"whoami": record({"name": "me"}), "create_repo": record(Repo), "upload_folder": record(),
             "dataset_push": record(), "card_push": record()}
    monkeypatch.setattr(hub, "whoami", calls["whoami"])
    monkeypatch.setattr(hub, "create_repo", calls["create_repo"])
    monkeypatch.setattr(hub, "upload_folder", calls["upload_folder"])
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, *a, **kw: calls["dataset_push"](self, *a, **kw))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, *a, **kw: calls["card_push"](self, *a, **kw))
    return calls
