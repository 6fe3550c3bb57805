"""Loading image datasets (Hub id, image folder or `save_to_disk` folder), checking them, and feeding them.

No torchvision: it does not import beside the pinned torch, so transforms are PIL + numpy.
"""

import contextlib
import io
import os

import datasets
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from .errors import UserError


class DatasetError(UserError):
    """Bad user data."""


def _looks_like_path(name: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else that does not exist locally is a missing path.
    return name.startswith((".", "/", "~")) or name.rstrip("/").count("/") > 1


@contextlib.contextmanager
def no_progress_bars():
    """datasets' progress bars off for a while (a local folder is not downloaded, whatever its bar says)."""
    was_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            datasets.utils.logging.enable_progress_bar()


def load_image_splits(name: str, config_name=None, cache_dir=None) -> datasets.DatasetDict:
    """Every split of a Hub id, a folder of class sub-folders of images, or a `Dataset(Dict).save_to_disk` folder
    (a single saved `Dataset` is the split "train")."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(path)
        else:
            try:  # as datasets.load_dataset(path) does: the builder detected from the files (images, parquet,
                # json lines or csv beside images, arrow shards); without its "Downloading data" bars for local files
                with no_progress_bars():
                    ds = datasets.load_dataset(path, cache_dir=cache_dir)
            except datasets.data_files.EmptyDatasetError as e:
                raise DatasetError(f"--dataset {name} holds no images: give a folder of images (in class "
                                   "sub-folders, or with a metadata.jsonl), a save_to_disk folder or a Hub id") from e
    elif os.path.exists(path):
        raise DatasetError(f"--dataset {name} is a file; give a folder of images, a save_to_disk folder or a Hub id")
    elif _looks_like_path(name):
        raise DatasetError(f"--dataset path {name} does not exist")
    else:
        try:
            ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
        except Exception as e:  # offline, unknown id, private repo...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatasetError(f"no local folder {name!r}, and loading it from the Hub failed: {first}") from e
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def pick_split(splits: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    """One non-empty split, or one error line naming the splits there are."""
    if split not in splits:
        raise DatasetError(f"dataset {name} has no split {split!r} (it has {', '.join(splits)})")
    if len(splits[split]) == 0:
        raise DatasetError(f"dataset {name} split {split!r} is empty")
    return splits[split]


def load_image_dataset(name: str, split: str = "train", config_name=None, cache_dir=None) -> datasets.Dataset:
    """One split of a Hub id, a folder of class sub-folders of images, or a `Dataset(Dict).save_to_disk` folder."""
    return pick_split(load_image_splits(name, config_name, cache_dir), split, name)


def find_column(ds: datasets.Dataset, wanted, feature_type, what: str) -> str | None:
    """The named column, or the only column of `feature_type` when none is named."""
    if wanted is not None:
        if wanted not in ds.column_names:
            raise DatasetError(f"dataset has no {what} column {wanted!r} (columns: {', '.join(ds.column_names)})")
        return wanted
    matches = [c for c, f in ds.features.items() if isinstance(f, feature_type)]
    if len(matches) == 1:
        return matches[0]
    for default in ("image", "img") if what == "image" else ("label", "labels"):
        if default in ds.column_names:
            return default
    return None


def require_column(ds: datasets.Dataset, wanted, feature_type, what: str, flag: str, where: str = "dataset") -> str:
    """find_column, or one error line listing the columns and the flag that names one."""
    column = find_column(ds, wanted, feature_type, what)
    if column is None:
        raise DatasetError(f"{where} has no {what} column (columns: {', '.join(ds.column_names)}); pass {flag}")
    return column


def check_captions(ds: datasets.Dataset, column: str, name: str) -> None:
    """Every row has a caption: a string, or a list whose first entry is one (a null would fail mid-training)."""
    for i, caption in enumerate(ds[column]):
        first = caption[0] if isinstance(caption, list) and caption else caption
        if not isinstance(first, str):
            raise DatasetError(f"row {i} of {name} has no caption in {column!r} ({caption!r})")


def class_names(ds: datasets.Dataset, label_column: str) -> list[str]:
    """Names of the classes, index = label id. A ClassLabel gives its names; other ints are named by their value."""
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = ds.unique(label_column)
    if not all(isinstance(v, (int, np.integer)) and v >= 0 for v in values):
        raise DatasetError(f"label column {label_column!r} must hold non-negative integers or be a ClassLabel")
    return [str(i) for i in range(max(values) + 1)]


def indices_by_class(labels, num_classes: int) -> list[np.ndarray]:
    """The row indices of each class, ascending."""
    labels = np.asarray(labels)
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def stratified_split(labels, num_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) row indices: `fraction` of every class held out (rounded, at least one image where a class
    has two or more), seeded; both sorted."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for rows in indices_by_class(labels, num_classes):
        rows = rng.permutation(rows)
        n = min(len(rows) - 1, max(1, int(fraction * len(rows) + 0.5))) if len(rows) > 1 else 0
        held.append(rows[:n])
        kept.append(rows[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def per_class_subset(labels, num_classes: int, seed: int, fraction: float | None = None,
                     samples_per_class: int | None = None) -> np.ndarray:
    """Seeded per-class subset of the rows: `fraction` of each class (rounded half up) or `samples_per_class`
    images of each (all of a smaller class). Sorted row indices."""
    rng = np.random.default_rng(seed)
    chosen = []
    for rows in indices_by_class(labels, num_classes):
        n = int(fraction * len(rows) + 0.5) if fraction is not None else min(samples_per_class, len(rows))
        chosen.append(rng.permutation(rows)[:n])
    return np.sort(np.concatenate(chosen))


def check_images(ds: datasets.Dataset, image_column, progress=None, check_row=None) -> None:
    """Decode every image once, so a corrupt file fails now, with its name, and not hours into training.
    `image_column`: one column or several (e.g. image and control, decoded in the same pass); `check_row(i, images,
    where)` may then check the decoded images of row i together and raise a DatasetError."""
    columns = [image_column] if isinstance(image_column, str) else list(image_column)
    raw = ds.select_columns(columns)
    for column in columns:
        raw = raw.cast_column(column, datasets.Image(decode=False))
    rows = iter(raw)  # one at a time: the whole set's bytes never sit in memory
    for i, row in enumerate(progress(rows, total=len(raw)) if progress else rows):
        images = []
        for column in columns:
            item = row[column]
            where = item.get("path") or f"row {i}"
            try:
                img = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") is not None else item["path"])
                img.load()
            except Exception as e:
                raise DatasetError(f"corrupt or unreadable image {where}: {type(e).__name__}: {e}") from e
            images.append(img)
        if check_row is not None:
            check_row(i, images, row[columns[0]].get("path") or f"row {i}")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / DiT preprocessing: box-downsample by halves, bicubic-resize the short side, centre-crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def to_tensor(pil_image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(center_crop_arr(pil_image.convert("RGB"), resolution), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def image_transform(image_column: str, label_column: str, resolution: int):
    """A `Dataset.with_transform` function yielding `pixel_values` and `labels`. Flips happen in the training
    loop, with the run's own generator, so a resumed run makes the same random choices as an uninterrupted one."""

    def transform(batch):
        return {
            "pixel_values": [to_tensor(img, resolution) for img in batch[image_column]],
            "labels": batch[label_column],
        }

    return transform


class ArrowBatches(torch.utils.data.Dataset):
    """Numeric columns of a dataset (labels, stored latents), fetched a whole batch at a time straight from Arrow.
    Use it with `collate_fn=as_batch`; the DataLoader then calls `__getitems__` with each batch's indices.

    datasets' own row access re-reads the Array3D extension types' metadata (JSON) for every chunk on every fetch,
    which cost about 5 ms per batch of a small model's latents, more than its training step's forward pass; so the
    columns are viewed once, zero-copy, as their plain Arrow storage (the dataset's memory map is kept), and a batch
    is one `take`. That reads datasets' internals (`data.table`, `_indices`): at start a few rows are fetched both
    ways and compared, and on any difference or error the public API serves every batch instead."""

    def __init__(self, ds: datasets.Dataset, columns: list[str]):
        self.shapes = {c: tuple(getattr(ds.features[c], "shape", ())) for c in columns}
        self.length = len(ds)
        self.public = ds.select_columns(columns).with_format("numpy")  # the fallback: datasets' public API
        self.table = None
        try:  # `data.table` and `_indices` are datasets internals: used only while they behave as assumed
            table = ds.data.table  # the (memory-mapped) Arrow table; `_indices` maps rows after select/shuffle
            self.table = pa.table({c: _storage(table.column(c)) for c in columns})
            self.rows = ds._indices.column(0).to_numpy() if ds._indices is not None else None
            probe = sorted({0, self.length // 2, self.length - 1})
            fast, public = self._fetch(probe), self._fetch_public(probe)
            if any(not np.array_equal(fast[c].numpy(), public[c].numpy()) for c in columns):
                raise ValueError("the Arrow storage does not give the rows datasets gives")
        except Exception:  # datasets changed: slower, still right
            self.table = None

    def __len__(self):
        return self.length

    def __getitems__(self, indices):
        return self._fetch(indices) if self.table is not None else self._fetch_public(indices)

    def _fetch_public(self, indices):
        batch = self.public[list(indices)]
        return {name: torch.from_numpy(np.asarray(batch[name]).reshape(len(indices), *shape).copy())
                for name, shape in self.shapes.items()}

    def _fetch(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        table = self.table.take(pa.array(self.rows[indices] if self.rows is not None else indices))
        batch = {}
        for name, shape in self.shapes.items():
            column = table.column(name).combine_chunks()
            while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):
                column = column.flatten()
            batch[name] = torch.from_numpy(column.to_numpy(zero_copy_only=False).reshape(len(table), *shape).copy())
        return batch

    def __getitem__(self, index):
        return {name: value[0] for name, value in self.__getitems__([index]).items()}


def _storage(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An extension-typed column as its storage arrays (zero-copy); other columns as they are."""
    if isinstance(column.type, pa.ExtensionType):
        return pa.chunked_array([chunk.storage for chunk in column.chunks], type=column.type.storage_type)
    return column


def as_batch(batch):
    """collate_fn for ArrowBatches: the batch is already assembled."""
    return batch


def worker_options(num_workers: int) -> dict:
    """DataLoader worker options. Workers persist across epochs: a memory bank's loader ends an epoch every few
    steps (5000 rows / 16 per step), and respawning its workers each time costs more than the fetches they hide."""
    return dict(num_workers=num_workers, persistent_workers=num_workers > 0)


class ResumableLoader:
    """Cycles a (prepared) DataLoader forever and can start at any micro-step of a previous run.

    The DataLoader must use a seedable sampler (accelerate's `use_seedable_sampler=True`) and drop_last, so that
    epoch e always yields the same batches: micro-step k is then batch k % len of epoch k // len.
    """

    def __init__(self, dataloader, accelerator, start_micro_step: int = 0):
        self.dataloader, self.accelerator = dataloader, accelerator
        if len(dataloader) == 0:
            raise DatasetError("the dataset is smaller than one batch; lower --train_batch_size")
        self.epoch, skip = divmod(start_micro_step, len(dataloader))
        self._iter = self._epoch_iter(skip)

    def _epoch_iter(self, skip=0):
        self.dataloader.set_epoch(self.epoch)
        loader = self.accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iter)
        except StopIteration:
            self.epoch += 1
            self._iter = self._epoch_iter()
            return next(self._iter)
