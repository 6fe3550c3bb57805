"""Control fidelity and the sudden-convergence tracker for ControlNet training.

ControlNet "suddenly converges": after some steps the model abruptly starts to follow its control. Diff-Tuning's
ControlNet experiment measures when: on held-out real images with their controls, generate with the control,
annotate the generated image with the same annotator, and compare the two maps:

- canny, sketch: SSIM of the two maps after the same Gaussian blur (a 1-pixel shift of a thin edge keeps a high
  score); higher is better; the paper's thresholds 0.55, 0.75.
- depth, normal: MSE of the maps in [0, 1]; lower is better; 0.04, 0.06.
- segmentation: pixel accuracy of the class ids; higher is better; 0.5.
- custom: SSIM of the blurred RGB maps; higher is better; no default: pass --convergence_threshold.

The convergence step is the first evaluation of `patience` consecutive ones past the threshold. The paper notes
that after convergence the score no longer ranks quality: the tracker detects convergence, it does not grade images.
"""

import json
import math
import os

import numpy as np
import torch

from ..infra.outputs import write_json_atomically
from .annotators import control_map

METRICS = {  # condition -> (metric, higher is better, default threshold)
    "canny": ("blurred_ssim", True, 0.55),
    "sketch": ("blurred_ssim", True, 0.75),
    "depth": ("mse", False, 0.04),
    "normal": ("mse", False, 0.06),
    "segmentation": ("pixel_accuracy", True, 0.5),
    "custom": ("blurred_ssim", True, None),
}
METRIC_RANGES = {"blurred_ssim": (-1.0, 1.0), "mse": (0.0, 1.0), "pixel_accuracy": (0.0, 1.0)}
CONVERGENCE_FILE = "convergence.json"


def _as_batch(a: np.ndarray) -> torch.Tensor:
    """H x W or H x W x C -> 1 x C x H x W float64."""
    t = torch.as_tensor(np.asarray(a, dtype=np.float64))
    return (t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None])


def blurred_ssim(a: np.ndarray, b: np.ndarray, blur_sigma: float = 2.0) -> float:
    """SSIM (torchmetrics, Gaussian window) of two maps in [0, 1] after the same Gaussian blur of `blur_sigma`
    pixels; the window shrinks to the image for small images."""
    from scipy.ndimage import gaussian_filter
    from torchmetrics.functional.image import structural_similarity_index_measure

    sigma = (blur_sigma, blur_sigma) + ((0,) if np.ndim(a) == 3 else ())
    a, b = (gaussian_filter(np.asarray(m, dtype=np.float64), sigma, mode="nearest") if blur_sigma > 0 else m
            for m in (a, b))
    size = min(11, *(d - (1 - d % 2) for d in np.shape(a)[:2]))  # odd, at most the image
    return float(structural_similarity_index_measure(_as_batch(a), _as_batch(b), data_range=1.0,
                                                     kernel_size=size, sigma=1.5 * size / 11))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))


def pixel_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def fidelity_score(condition: str, reference: np.ndarray, generated: np.ndarray, blur_sigma: float = 2.0) -> float:
    metric = METRICS[condition][0]
    if metric == "blurred_ssim":
        return blurred_ssim(reference, generated, blur_sigma)
    return mse(reference, generated) if metric == "mse" else pixel_accuracy(reference, generated)


def reference_map(annotator, image, control, condition: str) -> np.ndarray:
    """What a generated image's annotation is compared with: the row's control as a map (edges, sketch, depth,
    normals, custom), or for segmentation the class ids of the real image (palette colours of another annotator
    cannot be read back)."""
    return annotator.measure(image) if condition == "segmentation" else control_map(control, condition)


def check_threshold(condition: str, threshold: float | None) -> float:
    """The threshold in force (the paper's default when None), refused in one line outside the metric's range."""
    from ..infra.errors import UserError

    metric, _, default = METRICS[condition]
    threshold = default if threshold is None else threshold
    if threshold is None:
        raise UserError(f"--condition {condition} has no default --convergence_threshold; pass one "
                        f"({metric}, in {METRIC_RANGES[metric]})")
    lo, hi = METRIC_RANGES[metric]
    if not lo <= threshold <= hi:
        raise UserError(f"--convergence_threshold {threshold} is outside the range of {metric} ([{lo}, {hi}])")
    return threshold


class ConvergenceTracker:
    """The fidelity curve of a run: one point per evaluation, the convergence step once `patience` consecutive
    points are past the threshold, kept in `convergence.json` (rewritten atomically after every evaluation; a
    resumed run continues it from the points up to its step)."""

    def __init__(self, condition: str, threshold: float, patience: int = 1, path: str | None = None):
        self.metric, self.higher_is_better, _ = METRICS[condition]
        self.condition, self.threshold, self.patience, self.path = condition, threshold, patience, path
        self.points: list[dict] = []

    def passes(self, score: float) -> bool:
        return score >= self.threshold if self.higher_is_better else score <= self.threshold

    @property
    def converged_at(self) -> int | None:
        run = 0
        for i, point in enumerate(self.points):
            run = run + 1 if self.passes(point["score"]) else 0
            if run == self.patience:
                return self.points[i - self.patience + 1]["step"]
        return None

    def add(self, step: int, score: float) -> None:
        if not math.isfinite(score):
            raise ValueError(f"fidelity score {score} at step {step} is not finite")
        self.points = [p for p in self.points if p["step"] < step] + [{"step": step, "score": score}]
        if self.path:
            write_json_atomically(self.path, self.state())

    @property
    def passed_before_training(self) -> bool:
        """The score at step 0 is already past the threshold: "converged at 0" would say nothing about training."""
        return bool(self.points) and self.points[0]["step"] == 0 and self.passes(self.points[0]["score"])

    def state(self) -> dict:
        return {"condition": self.condition, "metric": self.metric,
                "direction": "higher" if self.higher_is_better else "lower", "threshold": self.threshold,
                "patience": self.patience, "converged_at": self.converged_at,
                "threshold_passed_before_training": self.passed_before_training, "points": self.points}

    def resume(self, step: int) -> None:
        """Keep the points of a previous run up to `step` (the checkpoint resumed from)."""
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.points = [p for p in json.load(f)["points"] if p["step"] <= step]

    def plot(self, path: str, title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([p["step"] for p in self.points], [p["score"] for p in self.points], marker="o", ms=3)
        ax.axhline(self.threshold, color="grey", ls="--", lw=1, label=f"threshold {self.threshold:g}")
        if self.converged_at is not None:
            ax.axvline(self.converged_at, color="tab:red", lw=1, label=f"converged at step {self.converged_at}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{self.metric} ({self.direction_word})")
        ax.set_title(title or f"control fidelity ({self.condition})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    @property
    def direction_word(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"
