"""Timestep weights and samplers.

Diff-Tuning (docs/methods.md) samples the timestep of each loss from a categorical distribution over
t in {0..T-1} with u = (t+1)/T:
  adaptation (downstream data)  psi(t) = u^tau                      ("power", the paper's main form)
                                psi(t) = 1 / (1 + SNR(t)) = 1 - abar_t ("snr" variant; no tau)
  retention  (memory bank)      xi(t)  = 1 - psi(t)                 (paper)
                                xi(t)  = (T - t)^tau, i.e. psi reversed (official code; at tau = 1 one step from
                                                                         the paper's, which is 0 at t = T-1)
tau = 0 gives a uniform psi, i.e. standard fine-tuning.

DeMe's timestep ranges and their sampler are in `utils.methods.deme`.
"""

import torch

XI_FORMS = ("paper", "official")
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
        # thuml/Diffusion-Tuning: (T - t)^tau for t = 0..T-1, psi reversed; over T that is (1 - u + 1/T)^tau,
        # positive at t = T-1 (where (1 - u)^tau would be 0)
        return (1.0 - _u(num_timesteps) + 1.0 / num_timesteps) ** tau
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
