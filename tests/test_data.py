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
