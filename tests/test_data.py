import datasets
import numpy as np
import pytest
import torch

from utils.infra.data import ArrowBatches, as_batch


@pytest.mark.parametrize("view", ["whole", "selected", "several_chunks"])
def test_arrow_batches_equal_datasets_formatting(view):
    rng = np.random.default_rng(0)
    features = datasets.Features({"label": datasets.Value("int64"), "latent": datasets.Array3D((2, 3, 4), "float32")})
    ds = datasets.Dataset.from_dict(
        {"label": rng.integers(0, 10, 12), "latent": rng.normal(size=(12, 2, 3, 4)).astype(np.float32)},
        features=features)
    if view == "selected":  # an indices mapping over the table (select, shuffle, train_test_split)
        ds = datasets.Dataset.from_dict(
            {"label": rng.integers(0, 10, 20), "latent": rng.normal(size=(20, 2, 3, 4)).astype(np.float32)},
            features=features).shuffle(seed=0).select(range(12))
    elif view == "several_chunks":
        ds = datasets.concatenate_datasets([ds.select(range(5)).flatten_indices(), ds.select(range(5, 12))])
    rows = ArrowBatches(ds, ["label", "latent"])
    assert len(rows) == 12
    indices = [7, 0, 11, 3]
    batch, reference = rows.__getitems__(indices), ds.with_format("numpy")[indices]
    assert batch["latent"].shape == (4, 2, 3, 4) and batch["latent"].dtype == torch.float32
    np.testing.assert_array_equal(batch["latent"].numpy(), reference["latent"])
    np.testing.assert_array_equal(batch["label"].numpy(), reference["label"])
    loaded = next(iter(torch.utils.data.DataLoader(rows, batch_size=5, collate_fn=as_batch)))
    np.testing.assert_array_equal(loaded["latent"].numpy(), ds.with_format("numpy")[:5]["latent"])
    np.testing.assert_array_equal(rows[2]["latent"].numpy(), ds.with_format("numpy")[2]["latent"])
    assert rows.table is not None  # the fast path is in use on this datasets version


def test_arrow_batches_fall_back_to_the_public_api_when_the_internals_change(monkeypatch):
    rng = np.random.default_rng(1)
    features = datasets.Features({"label": datasets.Value("int64"), "latent": datasets.Array3D((2, 3, 4), "float32")})
    ds = datasets.Dataset.from_dict(
        {"label": rng.integers(0, 10, 20), "latent": rng.normal(size=(20, 2, 3, 4)).astype(np.float32)},
        features=features).shuffle(seed=0).select(range(12))
    expected = ds.with_format("numpy")[[5, 1, 9]]
    from utils.infra import data

    # the Arrow storage read as datasets' internals once were, but rows come back in another order: caught at start
    real_storage = data._storage
    monkeypatch.setattr(data, "_storage", lambda column: real_storage(column).take(
        data.pa.array(range(len(column) - 1, -1, -1))))
    rows = ArrowBatches(ds, ["label", "latent"])
    assert rows.table is None  # the internals no longer behave as assumed: the public API serves
    batch = rows.__getitems__([5, 1, 9])
    np.testing.assert_array_equal(batch["latent"].numpy(), expected["latent"])
    np.testing.assert_array_equal(batch["label"].numpy(), expected["label"])


@pytest.mark.parametrize("layout", ["class_folders", "metadata_jsonl", "metadata_csv", "parquet", "save_to_disk"])
def test_every_local_layout_loads_as_datasets_load_dataset_would(layout, tmp_path):
    """Image folders (class sub-folders, or metadata.jsonl / metadata.csv beside the images), a folder of parquet
    files (a Hub snapshot) and save_to_disk folders all load, with their image and text columns."""
    import io
    import json

    from PIL import Image

    from utils.infra.data import load_image_dataset

    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    texts = [f"a red square {i}" for i in range(4)]
    if layout == "class_folders":
        for i, img in enumerate(images):
            (tmp_path / ("a" if i % 2 else "b")).mkdir(exist_ok=True)
            img.save(tmp_path / ("a" if i % 2 else "b") / f"{i}.png")
    elif layout in ("metadata_jsonl", "metadata_csv"):
        for i, img in enumerate(images):
            img.save(tmp_path / f"{i}.png")
        if layout == "metadata_jsonl":
            (tmp_path / "metadata.jsonl").write_text(
                "".join(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n" for i, t in enumerate(texts)))
        else:
            (tmp_path / "metadata.csv").write_text(
                "file_name,text\n" + "".join(f"{i}.png,{t}\n" for i, t in enumerate(texts)))
    else:
        def png(img):
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            return {"bytes": buffer.getvalue(), "path": None}

        ds = datasets.Dataset.from_dict({"image": [png(i) for i in images], "text": texts},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "text": datasets.Value("string")}))
        if layout == "parquet":
            (tmp_path / "data").mkdir()
            ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
        else:
            ds.save_to_disk(str(tmp_path / "saved"))
    ds = load_image_dataset(str(tmp_path / "saved" if layout == "save_to_disk" else tmp_path))
    assert len(ds) == 4 and isinstance(ds.features["image"], datasets.Image)
    assert np.asarray(ds[0]["image"].convert("RGB")).shape == (8, 8, 3)
    if layout == "class_folders":
        assert ds.features["label"].names == ["a", "b"]
    else:
        assert sorted(ds["text"]) == texts
