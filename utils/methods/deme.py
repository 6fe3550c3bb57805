"""DeMe ("Decouple-Then-Merge: Finetune Diffusion Models as Multi-Task Learning", Ma et al. 2025): its timestep
ranges and their sampler, the loss (denoising plus consistency with the frozen pre-trained model), the held-out
range losses the merge-weight search scores, and the range-folder format that `train_deme.py` writes and
`merge_timestep_models.py` reads.

Copy i of N trains on [lo_i, hi_i) of [0, T), drawing t from the whole of [0, T) with probability p instead, and is
held close to the pre-trained model by ||eps_theta(x_t, t) - eps_theta_i(x_t, t)||^2:

    loss = mean over the batch of the denoising MSE (Min-SNR-weighted with --snr_gamma)
           + consistency_weight * mean of (prediction - frozen prediction)^2
"""

import json
import os

import torch

from ..diffusion.forward_process import forward_process
from ..diffusion.losses import DenoisingBatch, compose_batch
from ..infra.outputs import write_json_atomically

GLOBAL_SAMPLE_MODES = ("sample", "batch")
MANIFEST = "deme_manifest.json"  # in the output folder: the ranges and their folders
RANGE_FILE = "deme_range.json"  # in each range folder: which range that model trained on


def timestep_ranges(num_timesteps: int, num_ranges: int) -> list[tuple[int, int]]:
    """[lo, hi) of N equal (to within one step) ranges covering [0, T), lowest timesteps first."""
    if not 1 <= num_ranges <= num_timesteps:
        raise ValueError(f"the number of ranges must be in 1..{num_timesteps}, got {num_ranges}")
    edges = [i * num_timesteps // num_ranges for i in range(num_ranges + 1)]
    return list(zip(edges[:-1], edges[1:]))


class RangeTimestepSampler:
    """DeMe's timesteps for the copy trained on [lo, hi): uniform on the range with probability 1 - p, uniform on
    [0, T) with probability p.

    mode "sample" decides per sample. mode "batch" decides once per batch and pairs each t with its mirror
    lo + hi - 1 - t in the chosen interval (antithetic sampling), as the official code does. Both give every sample
    the same marginal distribution.
    """

    def __init__(self, num_timesteps: int, lo: int, hi: int, global_prob: float, mode: str = "sample"):
        if not 0 <= lo < hi <= num_timesteps:
            raise ValueError(f"range [{lo}, {hi}) is not inside [0, {num_timesteps})")
        if not 0 <= global_prob <= 1:
            raise ValueError(f"global_prob must be in [0, 1], got {global_prob}")
        if mode not in GLOBAL_SAMPLE_MODES:
            raise ValueError(f"mode must be one of {GLOBAL_SAMPLE_MODES}, got {mode!r}")
        self.T, self.lo, self.hi, self.p, self.mode = num_timesteps, lo, hi, global_prob, mode

    def probs(self) -> torch.Tensor:
        """The marginal distribution of one sample's t, float64 of length T."""
        probs = torch.full((self.T,), self.p / self.T, dtype=torch.float64)
        probs[self.lo : self.hi] += (1 - self.p) / (self.hi - self.lo)
        return probs

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        if self.mode == "sample":
            is_global = torch.rand(n, generator=generator, device=device) < self.p
            lo = torch.where(is_global, 0, self.lo)
            width = torch.where(is_global, self.T, self.hi - self.lo)
            return lo + (torch.rand(n, generator=generator, device=device) * width).long().clamp(max=width - 1)
        is_global = torch.rand(1, generator=generator, device=device).item() < self.p
        lo, hi = (0, self.T) if is_global else (self.lo, self.hi)
        # as MqLeet/DeMe's train_unconditional_deme.py: n // 2 + 1 draws, then their mirrors, cut to n (for even n:
        # n/2 + 1 drawn and n/2 - 1 mirrored)
        drawn = torch.randint(lo, hi, (n // 2 + 1,), generator=generator, device=device)
        return torch.cat([drawn, lo + hi - 1 - drawn])[:n]


class DeMeLoss:
    """The loss of one range's copy, EDM-style: `loss, parts = deme_loss(family, net, frozen, rows, generator)`.
    `frozen` is the pre-trained model (in the mixed-precision dtype) that gives the consistency targets."""

    def __init__(self, sampler: RangeTimestepSampler, consistency_weight: float = 1.0,
                 snr_gamma: float | None = None, dtype=torch.float32):
        self.sampler, self.consistency_weight, self.snr_gamma = sampler, consistency_weight, snr_gamma
        self.dtype = dtype  # of the frozen model

    @torch.no_grad()
    def batch(self, family, rows: dict, generator) -> DenoisingBatch:
        """x_0 (flipped with --random_flip), t from the range sampler, the noise and the target."""
        data = family.rows(rows, generator)
        x0 = family.x0(data.x, generator)
        process = forward_process(family.scheduler, snr_gamma=self.snr_gamma)
        # ranges count from the data side: DDPM's t, flow matching's smallest sigma first
        index = process.index_from_data_side(self.sampler.sample(len(x0), generator, family.device))
        return compose_batch(process, family, x0, data.cond, index, generator)

    def __call__(self, family, net, frozen, rows: dict, generator) -> tuple[torch.Tensor, dict]:
        b = self.batch(family, rows, generator)
        reference = None
        if self.consistency_weight:
            with torch.no_grad():
                reference = family.predict(frozen, b.noisy.to(self.dtype), b.timesteps, b.cond)
        pred = family.predict(net, b.noisy, b.timesteps, b.cond).float()
        per_sample = family.prediction_loss(pred, b)  # per-sample MSE on the family's target (SD3: preconditioned)
        if b.loss_weights is not None:  # Min-SNR-gamma (--snr_gamma)
            per_sample = per_sample * b.loss_weights
        loss_denoise = per_sample.mean()
        loss_consistency = (pred - reference.float()).pow(2).mean() if reference is not None else torch.zeros(())
        loss = loss_denoise + self.consistency_weight * loss_consistency
        return loss, {"loss_denoise": loss_denoise, "loss_consistency": loss_consistency}


@torch.no_grad()
def range_losses(family, unet, batches, ranges, seed: int = 0) -> list[float]:
    """Held-out denoising loss of `unet` on each timestep range (the merge-weight search's score). The noise and
    timesteps depend only on `seed`, the batch and the range, so two models scored with the same seed see exactly
    the same problems. `family` must not flip (random_flip=False)."""
    losses, process = [], forward_process(family.scheduler)
    for r, (lo, hi) in enumerate(ranges):
        total, count = 0.0, 0
        for b, batch in enumerate(batches):
            g = torch.Generator(family.device).manual_seed(hash((seed, r, b)) & (2**63 - 1))
            data = family.rows(batch, g)
            x0 = family.x0(data.x, g)
            t = torch.randint(lo, hi, (len(x0),), generator=g, device=family.device)
            b = compose_batch(process, family, x0, data.cond, process.index_from_data_side(t), g)
            pred = family.predict(unet, b.noisy, b.timesteps, b.cond)
            total += (pred.float() - b.target.float()).pow(2).mean().item() * len(x0)
            count += len(x0)
        losses.append(total / count)
    return losses


# ---- The range-folder format: <output_dir>/deme_manifest.json and <output_dir>/range_<i>/deme_range.json.

def range_dir(output_dir: str, index: int) -> str:
    return os.path.join(output_dir, f"range_{index}")


def is_finished(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "README.md"))  # the card is written last


def write_manifest(output_dir: str, base_model: str, model_class: str, num_timesteps: int, channel_projection: str,
                   ranges) -> None:
    write_json_atomically(os.path.join(output_dir, MANIFEST), {
        "method": "deme", "base_model": base_model, "model_class": model_class, "num_train_timesteps": num_timesteps,
        "channel_projection": channel_projection,
        "ranges": [{"index": i, "timesteps": list(r), "folder": os.path.basename(range_dir("", i))}
                   for i, r in enumerate(ranges)],
    })


def write_range_record(folder: str, index: int, num_ranges: int, time_range, num_timesteps: int, base_model: str,
                       channel_projection: str) -> None:
    write_json_atomically(os.path.join(folder, RANGE_FILE), {
        "index": index, "num_ranges": num_ranges, "timesteps": list(time_range), "num_train_timesteps": num_timesteps,
        "base_model": base_model, "channel_projection": channel_projection})


def expand_models(models: list[str]) -> list[str]:
    """A DeMe output folder (with its manifest) stands for its range folders, in range order."""
    if len(models) == 1 and os.path.exists(os.path.join(models[0], MANIFEST)):
        with open(os.path.join(models[0], MANIFEST)) as f:
            return [os.path.join(models[0], r["folder"]) for r in json.load(f)["ranges"]]
    return models


def model_ranges(models: list[str], num_timesteps: int) -> list[tuple[int, int]]:
    """Timestep range of each model: from its deme_range.json, else N equal ranges in the given order."""
    ranges = timestep_ranges(num_timesteps, len(models))
    for i, path in enumerate(models):
        if os.path.exists(os.path.join(path, RANGE_FILE)):
            with open(os.path.join(path, RANGE_FILE)) as f:
                ranges[i] = tuple(json.load(f)["timesteps"])
    return ranges
