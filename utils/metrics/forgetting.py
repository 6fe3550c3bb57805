"""A forgetting probe for text-to-image fine-tuning: samples of prompts the base model could already draw, with fixed
seeds, scored against the base model's own samples for the same prompts and seeds (SSIM in [0, 1]; 1 = the base
model's picture unchanged), recorded along training (`forgetting.json`, `forgetting.png`).

Same seeds make the comparison paired: a model that kept what it knew redraws nearly the base model's picture for a
prompt the fine-tuning data never showed; one that forgot draws the new data's style or content instead."""

import json
import os

import numpy as np
from skimage.metrics import structural_similarity

from ..infra.outputs import write_json_atomically

FORGETTING_FILE = "forgetting.json"


def similarity_to_base(images: np.ndarray, base: np.ndarray) -> float:
    """Mean SSIM of NHWC images in [0, 1] against the base model's images of the same prompts and seeds."""
    side = min(7, *images.shape[1:3])
    window = side if side % 2 else side - 1  # SSIM's window: odd, at most the image
    return float(np.mean([structural_similarity(a, b, channel_axis=2, data_range=1.0, win_size=window)
                          for a, b in zip(images, base)]))


class ForgettingProbe:
    """The curve of `similarity_to_base` over training steps, written after every evaluation (main process only;
    `path` None elsewhere). A resumed run keeps the points up to its checkpoint and continues from there, so its
    record equals an uninterrupted run's."""

    def __init__(self, prompts: list[str], base_images: np.ndarray | None, path: str | None):
        self.prompts, self.base_images, self.path = prompts, base_images, path
        self.points: list[dict] = []

    def resume(self, step: int) -> None:
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                self.points = [p for p in json.load(f)["points"] if p["step"] <= step]

    def add(self, step: int, images: np.ndarray) -> float:
        score = similarity_to_base(images, self.base_images)
        self.points = [p for p in self.points if p["step"] != step] + [{"step": step, "ssim_to_base": score}]
        if self.path:
            write_json_atomically(self.path, {"prompts": self.prompts, "metric": "ssim_to_base",
                                              "points": self.points})
        return score

    def plot(self, path: str, title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot([p["step"] for p in self.points], [p["ssim_to_base"] for p in self.points], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("SSIM to the base model's samples")
        ax.set_ylim(0, 1.02)
        ax.set_title(title or "forgetting probe (1 = nothing forgotten)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
