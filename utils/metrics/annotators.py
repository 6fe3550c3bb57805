"""Control annotators for ControlNet: image in, control image out, plus the map the fidelity tracker compares
(`Annotator.measure`).

- `canny`: white edges on black (scikit-image Canny); map: edges in [0, 1]; needs nothing.
- `sketch`: white lines on black, binarised XDoG (the paper's binarised HED needs weights: bring it with `custom`);
  map: lines in [0, 1]; needs nothing.
- `depth`: grey depth, min-max normalised per image; map: depth in [0, 1]; needs `--annotator_model`, a transformers
  depth-estimation model (e.g. a DPT/MiDaS checkpoint).
- `normal`: RGB normals from the depth's Sobel gradients, as ControlNet 1.0 derived them from MiDaS; map: normals
  in [0, 1]; needs `--annotator_model` (depth).
- `segmentation`: a colour per class (a fixed palette); map: class ids; needs `--annotator_model`, a transformers
  semantic-segmentation model.
- `custom`: whatever `--annotator module:callable` returns (PIL image in, PIL image out); map: the control as RGB
  in [0, 1].

No `controlnet_aux` and no torchvision: on our pinned stack both fail to import, and the detectors download weights
at run time. Every annotator is deterministic, so the same image always gets the same control.
"""

import importlib
import os
import sys

import numpy as np
from PIL import Image

from ..infra.errors import UserError

CONDITIONS = ("canny", "sketch", "depth", "normal", "segmentation", "custom")
NEEDS_MODEL = ("depth", "normal", "segmentation")


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _to_image(map01: np.ndarray) -> Image.Image:
    """A map in [0, 1] (H x W or H x W x 3) as an RGB image."""
    pixels = (np.clip(map01, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels if pixels.ndim == 3 else np.stack([pixels] * 3, -1))


def control_map(control: Image.Image, condition: str) -> np.ndarray:
    """A control image as the map `Annotator.measure` returns for that condition (grey or RGB in [0, 1])."""
    if condition in ("canny", "sketch", "depth"):
        return _grey(control)
    return np.asarray(control.convert("RGB"), dtype=np.float64) / 255.0


def palette(n: int = 256) -> np.ndarray:
    """A fixed colour per class id (id 0 black): how segmentation controls are drawn."""
    colours = np.random.default_rng(0).integers(32, 256, size=(n, 3), dtype=np.uint8)
    colours[0] = 0
    return colours


class Annotator:
    """`annotator(image)` -> the control image; `annotator.measure(image)` -> the map fidelity compares;
    `annotator.settings` -> what a memory bank records (a bank made with other settings is refused)."""

    condition = "custom"

    def __call__(self, image: Image.Image) -> Image.Image:
        return _to_image(self.measure(image))

    def measure(self, image: Image.Image) -> np.ndarray:
        raise NotImplementedError

    @property
    def settings(self) -> dict:
        return {"condition": self.condition}

    def check_model(self) -> None:
        """Whatever can be checked without loading weights (a model-based annotator: its config)."""


class Canny(Annotator):
    condition = "canny"

    def __init__(self, sigma: float = 1.0, low_threshold: float = 0.1, high_threshold: float = 0.2):
        self.sigma, self.low, self.high = sigma, low_threshold, high_threshold

    def measure(self, image):
        from skimage.feature import canny

        edges = canny(_grey(image), sigma=self.sigma, low_threshold=self.low, high_threshold=self.high)
        return edges.astype(np.float64)

    @property
    def settings(self):
        return {"condition": "canny", "sigma": self.sigma, "low_threshold": self.low, "high_threshold": self.high}


class XDoGSketch(Annotator):
    """Binarised eXtended Difference of Gaussians (Winnemoeller et al. 2012): a line where
    G_sigma(I) - tau * G_{k sigma}(I) < epsilon, i.e. on the dark side of every edge."""

    condition = "sketch"

    def __init__(self, sigma: float = 1.0, k: float = 1.6, tau: float = 0.98, epsilon: float = -0.01):
        self.sigma, self.k, self.tau, self.epsilon = sigma, k, tau, epsilon

    def measure(self, image):
        from skimage.filters import gaussian

        grey = _grey(image)
        dog = gaussian(grey, self.sigma) - self.tau * gaussian(grey, self.sigma * self.k)
        return (dog < self.epsilon).astype(np.float64)

    @property
    def settings(self):
        return {"condition": "sketch", "sigma": self.sigma, "k": self.k, "tau": self.tau, "epsilon": self.epsilon}


class _TransformersAnnotator(Annotator):
    task = architecture = ""  # the pipeline task, and what the model's architecture name must contain

    def __init__(self, model: str, device=None):
        self.model = model
        self._pipe, self._device = None, device

    @property
    def pipe(self):
        if self._pipe is None:  # loaded on first use: checks and --help stay cheap
            from transformers import pipeline

            try:
                self._pipe = pipeline(self.task, model=self.model, device=self._device)
            except (OSError, ValueError) as e:
                raise UserError(f"--annotator_model {self.model!r} is no {self.task} model: "
                                f"{str(e).strip().splitlines()[0]}") from e
        return self._pipe

    @property
    def settings(self):
        return {"condition": self.condition, "annotator_model": self.model}

    def check_model(self) -> None:
        """From the model's config alone (no weights): it exists and is a model of this task."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.model)
        except (OSError, ValueError) as e:
            raise UserError(f"--annotator_model {self.model!r} cannot be loaded: "
                            f"{str(e).strip().splitlines()[0]}") from e
        names = config.architectures or [config.model_type]
        if not any(self.architecture in name for name in names):
            raise UserError(f"--annotator_model {self.model} is a {', '.join(names)}, not a {self.task} model "
                            f"(its architecture should end in ...For{self.architecture})")


class Depth(_TransformersAnnotator):
    condition, task, architecture = "depth", "depth-estimation", "DepthEstimation"

    def measure(self, image):
        import torch

        predicted = self.pipe(image.convert("RGB"))["predicted_depth"].float()
        depth = torch.nn.functional.interpolate(predicted.reshape(1, 1, *predicted.shape[-2:]),
                                                size=image.size[::-1], mode="bicubic", align_corners=False)[0, 0]
        depth = depth.double().numpy()
        span = depth.max() - depth.min()
        return (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)


def normals_from_depth(depth: np.ndarray, strength: float = 2 * np.pi, background: float = 0.1) -> np.ndarray:
    """ControlNet 1.0's normal map from a relative (inverse) depth in [0, 1]: Sobel gradients as x and y, a
    constant z, normalised, in [0, 1]; gradients where depth < `background` are zeroed (far background)."""
    from scipy.ndimage import sobel

    x = sobel(depth, axis=1, mode="nearest")
    y = sobel(depth, axis=0, mode="nearest")
    x[depth < background] = 0
    y[depth < background] = 0
    normal = np.stack([x, y, np.full_like(x, strength)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return normal * 0.5 + 0.5


class Normal(Depth):
    condition = "normal"

    def __init__(self, model: str, background: float = 0.1, device=None):
        super().__init__(model, device)
        self.background = background

    def measure(self, image):
        return normals_from_depth(super().measure(image), background=self.background)

    @property
    def settings(self):
        return {**super().settings, "background": self.background}


class Segmentation(_TransformersAnnotator):
    condition, task, architecture = "segmentation", "image-segmentation", "SemanticSegmentation"

    def measure(self, image):
        """Class ids per pixel (0 where no class; ids are the model's label ids + 1)."""
        label2id = {name: int(i) for name, i in self.pipe.model.config.label2id.items()}
        labels = np.zeros(image.size[::-1], dtype=np.int64)
        for segment in self.pipe(image.convert("RGB"), subtask="semantic"):
            labels[np.asarray(segment["mask"]) > 127] = label2id[segment["label"]] + 1
        return labels

    def __call__(self, image):
        return Image.fromarray(palette()[self.measure(image) % 256])


class Custom(Annotator):
    """`module:callable` (a file path `dir/file.py:callable` works too): PIL image in, PIL image out."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_callable(spec)

    def __call__(self, image):
        control = self.fn(image)
        if not isinstance(control, Image.Image):
            raise UserError(f"--annotator {self.spec} returned a {type(control).__name__}, not a PIL image "
                            "(return Image.fromarray(array) for an array)")
        return control.convert("RGB")

    def measure(self, image):
        return control_map(self(image), "custom")

    @property
    def settings(self):
        return {"condition": "custom", "annotator": self.spec}


def load_callable(spec: str):
    """`module:callable` -> the callable, or one clear error line."""
    if ":" not in spec:
        raise UserError(f"--annotator {spec!r} must be module:callable")
    module_name, name = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
            module_name = os.path.basename(module_name)[:-3]
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--annotator {spec!r} does not import: {e}") from e
    if not callable(fn):
        raise UserError(f"--annotator {spec!r} is not callable")
    return fn


def make_annotator(condition: str, *, annotator_model=None, annotator=None, canny_sigma=1.0,
                   canny_low_threshold=0.1, canny_high_threshold=0.2, xdog_sigma=1.0, xdog_k=1.6, xdog_tau=0.98,
                   xdog_epsilon=-0.01, normal_background=0.1, device=None) -> Annotator:
    """The run's annotator, checked in one line (weights of model annotators load on first use)."""
    if condition not in CONDITIONS:
        raise UserError(f"unknown --condition {condition!r}; available: {', '.join(CONDITIONS)}")
    if condition in NEEDS_MODEL and not annotator_model:
        raise UserError(f"--condition {condition} needs --annotator_model (a transformers "
                        f"{'semantic-segmentation' if condition == 'segmentation' else 'depth-estimation'} model: "
                        "a Hub id or a folder)")
    if condition == "custom" and not annotator:
        raise UserError("--condition custom needs --annotator module:callable (PIL image in, PIL image out)")
    if annotator and condition != "custom":
        raise UserError(f"--annotator is for --condition custom, not {condition}")
    if condition == "canny":
        return Canny(canny_sigma, canny_low_threshold, canny_high_threshold)
    if condition == "sketch":
        return XDoGSketch(xdog_sigma, xdog_k, xdog_tau, xdog_epsilon)
    if condition == "depth":
        return Depth(annotator_model, device)
    if condition == "normal":
        return Normal(annotator_model, normal_background, device)
    if condition == "segmentation":
        return Segmentation(annotator_model, device)
    return Custom(annotator)


def add_annotator_args(p) -> None:
    """The "control" flag group: which annotator makes controls, and its settings (training and bank generation
    must use the same, or the bank's controls differ from the data's)."""
    g = p.add_argument_group("control")
    g.add_argument("--condition", choices=CONDITIONS, default="canny",
                   help="canny, sketch (XDoG), depth / normal / segmentation (transformers models), or custom.")
    g.add_argument("--annotator_model", default=None,
                   help="depth, normal: a depth-estimation model; segmentation: a semantic-segmentation model "
                        "(Hub id or folder).")
    g.add_argument("--annotator", default=None, help="custom: module:callable, PIL image in, PIL control out.")
    g.add_argument("--canny_sigma", type=float, default=1.0, help="canny: Gaussian sigma (scikit-image).")
    g.add_argument("--canny_low_threshold", type=float, default=0.1, help="canny: low hysteresis threshold.")
    g.add_argument("--canny_high_threshold", type=float, default=0.2, help="canny: high hysteresis threshold.")
    g.add_argument("--xdog_sigma", type=float, default=1.0, help="sketch: XDoG inner Gaussian sigma.")
    g.add_argument("--xdog_k", type=float, default=1.6, help="sketch: outer / inner sigma.")
    g.add_argument("--xdog_tau", type=float, default=0.98, help="sketch: weight of the outer Gaussian.")
    g.add_argument("--xdog_epsilon", type=float, default=-0.01, help="sketch: a line where the DoG is below this.")
    g.add_argument("--normal_background", type=float, default=0.1,
                   help="normal: depth below this (far background) gets a flat normal.")


def annotator_of(args, device=None):
    return make_annotator(args.condition, annotator_model=args.annotator_model, annotator=args.annotator,
                          canny_sigma=args.canny_sigma, canny_low_threshold=args.canny_low_threshold,
                          canny_high_threshold=args.canny_high_threshold, xdog_sigma=args.xdog_sigma,
                          xdog_k=args.xdog_k, xdog_tau=args.xdog_tau, xdog_epsilon=args.xdog_epsilon,
                          normal_background=args.normal_background, device=device)
