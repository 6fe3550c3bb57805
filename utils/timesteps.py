"""Timestep weights and samplers.

Diff-Tuning (docs/methods.md) samples the timestep of each loss from a categorical distribution over
t in {0..T-1} with u = (t+1)/T:
  adaptation (downstream data)  psi(t) = u^tau                      ("power", the paper's main form)
                                psi(t) = 1 / (1 + SNR(t)) = 1 - abar_t ("snr" variant; no tau)
  retention  (memory bank)      xi(t)  = 1 - psi(t)                 (paper)
                                xi(t)  = (1 - u)^tau                (official code; equal to the paper at tau = 1)
tau = 0 gives a uniform psi, i.e. standard fine-tuning.

DeMe (docs/methods.md) splits [0, T) into N equal ranges and trains copy i on range i, drawing t from the
whole of [0, T) with probability p instead (`RangeTimestepSampler`).
"""

import torch

XI_FORMS = ("paper", "official")
GLOBAL_SAMPLE_MODES = ("sample", "batch")
WEIGHTINGS = ("power", "snr")


def _u(num_timesteps: int) -> torch.Tensor:
    return torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps


def adaptation_weights(num_timesteps, tau=1.0, weighting="power", alphas_cumprod=None) -> torch.Tensor:
    """psi(t), unnormalised, as float64 of length T."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if weighting == "power":
        return _u(num_timesteps) ** tau
    if weighting == "snr":
        if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
            raise ValueError("weighting='snr' needs the scheduler's alphas_cumprod of length num_timesteps")
        return 1.0 - torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def retention_weights(num_timesteps, tau=1.0, xi_form="paper", weighting="power", alphas_cumprod=None):
    """xi(t), unnormalised, as float64 of length T."""
    if xi_form not in XI_FORMS:
        raise ValueError(f"xi_form must be one of {XI_FORMS}, got {xi_form!r}")
    if weighting == "power" and xi_form == "official":
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        return (1.0 - _u(num_timesteps)) ** tau
    return 1.0 - adaptation_weights(num_timesteps, tau, weighting, alphas_cumprod)


class CategoricalTimestepSampler:
    """Draws integer timesteps with probability proportional to `weights` (any non-negative vector)."""

    def __init__(self, weights: torch.Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if (weights < 0).any() or not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError("timestep weights must be finite, non-negative and not all zero")
        self.probs = (weights / weights.sum()).float()

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        probs = self.probs.to(device)
        return torch.multinomial(probs, n, replacement=True, generator=generator)


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
        half = torch.randint(lo, hi, ((n + 1) // 2,), generator=generator, device=device)
        return torch.cat([half, lo + hi - 1 - half])[:n]
