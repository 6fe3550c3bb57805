"""Tiny pipelines built from configs and offline image folders; nothing here touches the network."""

import os
import subprocess
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.offline_data import sklearn_digits, write_image_folder  # noqa: E402
from benchmarks.small_dit import build_pipeline  # noqa: E402

# Small and fast: 8x8 images, 4x4 latents, 2 DiT blocks; a few steps take well under a second.
TINY_ARGS = [
    "--resolution", "8", "--train_batch_size", "8", "--memory_bank_size", "16", "--memory_bank_batch_size", "8",
    "--memory_bank_inference_steps", "4", "--validation_inference_steps", "4", "--num_validation_images", "4",
    "--validation_steps", "0", "--report_to", "none", "--learning_rate", "1e-3",
]


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
    run_module("utils.memory_bank", "--pretrained_model_name_or_path", tiny_pipeline_dir, "--output_dir", path,
               "--size", "16", "--batch_size", "8", "--num_inference_steps", "4")
    return path


def run_module(module, *args, env=None, check=True):
    """Run `python -m module args` from the repo root, offline."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc
