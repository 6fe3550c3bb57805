"""Timestep weights and samplers.

Diff-Tuning (docs/methods.md) samples the timestep of each loss from a categorical distribution over
t in {0..T-1} with u = (t+1)/T:
  adaptation (downstream data)  psi(t) = u^tau                      ("power", the paper's main form)
                                psi(t) = 1 / (1 + SNR(t)) = 1 - abar_t ("snr" variant; no tau)
  retention  (memory bank)      xi(t)  = 1 - psi(t)                 (paper)
                                xi(t)  = (T - t)^tau, i.e. psi reversed (official code; at tau = 1 one step from
                                                                         the paper's, which is 0 at t = T-1)
tau = 0 gives a uniform psi, i.e. standard fine-tuning.

Flow matching (SD3, Flux: `FlowMatchEulerDiscreteScheduler`). Training draws an index i of the scheduler's N
discrete timesteps from a base density (diffusers' `--weighting_scheme` through
`compute_density_for_timestep_sampling`: u from it, i = int(u N); logit_normal and mode are non-uniform, the others
uniform) and noises with that index's sigma_i. The noise level is u = sigma_i (the DDPM analogue of (t+1)/T: 0 is
data, 1 is noise), so Diff-Tuning reweights the base density by the same functions of the noise level:
  adaptation  P(i) ~ base(i) psi(sigma_i),   psi = sigma^tau
  retention   P(i) ~ base(i) xi(sigma_i),    xi = 1 - sigma^tau (paper) or (1 - sigma)^tau (the official code's
                                             (T - t)^tau, i.e. (1 - t/T)^tau, with t/T the noise level)
`flow_base_probabilities` gives base(i) exactly for logit_normal (normal CDF of the bin edges' logits) and on a
2^20-point quantile grid for mode (its monotone map of a uniform); `flow_matching_weights` the products.

DeMe's timestep ranges and their sampler are in `utils.methods.deme`.
"""

import math

import torch

XI_FORMS = ("paper", "official")
WEIGHTINGS = ("power", "snr")
# diffusers' --weighting_scheme of its flow-matching scripts; only logit_normal and mode change the sampling density
# (cosmap and sigma_sqrt weight the loss: compute_loss_weighting_for_sd3)
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


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


def flow_base_probabilities(num_timesteps: int, weighting_scheme: str = "none", logit_mean: float = 0.0,
                            logit_std: float = 1.0, mode_scale: float = 1.29, grid: int = 2 ** 20) -> torch.Tensor:
    """P(i), i = 0..N-1, of diffusers' flow-matching draw: u from `compute_density_for_timestep_sampling`, then
    i = int(u N) (float64, sums to 1)."""
    if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {FLOW_WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    edges = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    if weighting_scheme == "logit_normal":  # u = sigmoid(n), n ~ N(mean, std): mass of [a, b) = Phi(logit b) - ...
        logits = torch.log(edges) - torch.log1p(-edges)  # -inf at 0, +inf at 1
        cdf = 0.5 * (1 + torch.erf((logits - logit_mean) / (logit_std * math.sqrt(2))))
        return cdf[1:] - cdf[:-1]
    if weighting_scheme == "mode":  # u = 1 - v - s (cos^2(pi v / 2) - 1 + v), v uniform: a monotone map of v
        v = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
        u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        index = (u * num_timesteps).long().clamp(0, num_timesteps - 1)
        return torch.bincount(index, minlength=num_timesteps).double() / grid
    return torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)


def flow_matching_weights(sigmas: torch.Tensor, base: torch.Tensor, tau: float = 1.0, role: str = "adaptation",
                          xi_form: str = "paper") -> torch.Tensor:
    """Diff-Tuning's weights of the N flow-matching timesteps (unnormalised float64): the base density times
    psi(sigma) = sigma^tau for adaptation, or xi(sigma) = 1 - sigma^tau (paper) / (1 - sigma)^tau (official) for
    retention. `sigmas`: the scheduler's training sigmas, index-aligned with its timesteps."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    sigma = torch.as_tensor(sigmas, dtype=torch.float64).clamp(0, 1)
    base = torch.as_tensor(base, dtype=torch.float64)
    if role == "adaptation":
        return base * sigma ** tau
    if role != "retention":
        raise ValueError(f"role must be 'adaptation' or 'retention', got {role!r}")
    if xi_form not in XI_FORMS:
        raise ValueError(f"xi_form must be one of {XI_FORMS}, got {xi_form!r}")
    return base * ((1 - sigma) ** tau if xi_form == "official" else 1 - sigma ** tau)


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
