"""The demo's measure of a transfer (fixtures.recognition, fixtures.transfer_figure): a digits classifier trained in
seconds reads real digits, and the recognition rate counts what it reads as the asked class."""

import json

import numpy as np
import pytest

from fixtures import small_dit, transfer_figure
from fixtures.offline_data import sklearn_digits, write_image_folder
from fixtures.recognition import as_input, recognition_rate, train_digit_classifier


def test_the_classifier_reads_held_out_digits_and_the_rate_counts_the_asked_class():
    images, labels, _ = sklearn_digits()
    net, accuracy = train_digit_classifier(images[:1500], labels[:1500], images[1500:], labels[1500:], 10, steps=300)
    assert accuracy >= 0.9
    assert recognition_rate(net, images[1500:], labels[1500:]) == accuracy
    assert recognition_rate(net, images[1500:], (labels[1500:] + 1) % 10) <= 0.1  # the wrong class is not read
    # a pipeline's float RGB output in [0, 1] and uint8 grey images are the same input
    rgb = np.repeat(images[1500:1510, :, :, None], 3, axis=-1).astype(np.float32) / 255
    assert np.allclose(as_input(rgb).numpy(), as_input(images[1500:1510]).numpy(), atol=1e-6)


def test_transfer_figure_measures_both_models(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Rates of the tiny untrained DiT (as source and as tuned model) land in recognition.json with the
    classifiers' held-out accuracies; the picture is written."""
    images, labels, names = sklearn_digits()
    train = write_image_folder(images[:400], labels[:400], names, str(tmp_path / "train"))
    held = write_image_folder(images[1500:1700], labels[1500:1700], names, str(tmp_path / "held"))
    import shutil

    from utils.families.dit import DiT

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    index["id2label"] = {str(i): n for i, n in enumerate(names)}
    (model / "model_index.json").write_text(json.dumps(index))
    assert sorted(DiT.load(str(model)).labels) == sorted(names)
    monkeypatch.setattr("sys.argv", ["transfer_figure", "--data", train, "--held_out", held, "--source", str(model),
                                     "--tuned", str(model), "--output", str(tmp_path / "t.png"), "--steps", "2",
                                     "--per_class", "2", "--classifier_steps", "200"])
    transfer_figure.main()
    report = json.loads((tmp_path / "recognition.json").read_text())
    assert set(report) == {"pre-trained", "fine-tuned"} and (tmp_path / "t.png").exists()
    for r in report.values():
        assert 0 <= r["rate"] <= 1 and r["classifier_held_out_accuracy"] >= 0.8


def test_a_cached_source_of_other_settings_is_refused_not_reused(tmp_path, monkeypatch):
    """The demo caches its source model; one pre-trained with other settings (an older, shorter demo) is named and
    refused, never silently reused or deleted."""
    cached = tmp_path / "source"
    cached.mkdir()
    (cached / "model_index.json").write_text("{}")
    # in this process: sys.exit(message) is what `python -m fixtures.small_dit` ends with (exit 1, message on stderr)
    monkeypatch.setattr("sys.argv", ["small_dit", "--output_dir", str(cached), "--dit_steps", "8000"])
    with pytest.raises(SystemExit) as refused:
        small_dit.main()
    assert isinstance(refused.value.code, str) and "pre-trained with other settings (None)" in refused.value.code
    assert (cached / "model_index.json").exists()
