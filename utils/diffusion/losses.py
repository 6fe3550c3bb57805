"""Per-sample diffusion losses. Each returns one value per sample so callers can split and weight a batch."""

import math
from dataclasses import dataclass

import torch


@dataclass
class DenoisingBatch:
    """One composed micro-batch, as a method (Diff-Tuning, DeMe) builds it and a model family's `loss` reads it:
    x_0, the conditioning, timesteps (as the model takes them), noise, the noisy input and the target; the first
    `n_bank` rows are memory-bank rows (Diff-Tuning)."""

    x0: torch.Tensor
    cond: dict
    timesteps: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    n_bank: int = 0
    loss_weights: torch.Tensor | None = None  # per-sample weights of the process (flow matching's cosmap, Min-SNR)


def compose_batch(process, family, x0: torch.Tensor, cond: dict, index: torch.Tensor, generator=None,
                  noise: torch.Tensor | None = None, n_bank: int = 0) -> DenoisingBatch:
    """The one noisy-batch composer (Diff-Tuning, DeMe, the premise check): the noise (drawn from `generator` unless
    given), the noisy input at indices `index` of the forward `process` (`utils.diffusion.forward_process`), what the
    model is given as its timesteps, the conditioning as the model takes it (`family.encode`), the target and the
    process's per-sample loss weights. A caller draws x_0 and `index` first, in its own order."""
    if noise is None:
        noise = process.draw_noise(x0, generator)
    noisy = process.noisy(x0, noise, index)
    timesteps = process.model_timesteps(index)
    return DenoisingBatch(x0, family.encode(cond), timesteps, noise, noisy, family.target(x0, noise, timesteps),
                          n_bank, process.loss_weights(index))


def epsilon_mse(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The simple loss ||eps - eps_theta(x_t, t)||^2, averaged over all but the batch axis."""
    return (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(1)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), as diffusers' training examples compute them: min(SNR(t),
    gamma) / SNR(t) for epsilon targets, / (SNR(t) + 1) for v targets, min(SNR(t), gamma) for sample targets. They
    turn a per-sample MSE on the model's own target into the paper's clipped x0-space weighting."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


class LearnedVarianceLoss:
    """The variational-bound term of improved DDPM's hybrid loss, as DiT trains its variance channels.

    The model predicts v in [-1, 1] per element; its log-variance interpolates between log beta_t and the clipped
    log posterior variance. The mean comes from the (detached) eps prediction, so this term trains only the
    variance channels. Returns, per sample, KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits, and at t = 0 the
    discretised Gaussian decoder NLL, exactly as `GaussianDiffusion._vb_terms_bpd` in DiT.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.tables = {
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "log_betas": torch.log(betas),
            "coef_x0": betas * prev.sqrt() / (1.0 - alphas_cumprod),
            "coef_xt": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        }

    def _at(self, name, t, like):
        return self.tables[name].to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))

    def __call__(self, eps_pred, var_values, x0, xt, t) -> torch.Tensor:
        eps_pred, var_values, x0, xt = (a.float() for a in (eps_pred.detach(), var_values, x0, xt))
        true_mean = self._at("coef_x0", t, xt) * x0 + self._at("coef_xt", t, xt) * xt
        true_log_var = self._at("posterior_log_variance_clipped", t, xt)

        frac = (var_values + 1) / 2
        model_log_var = frac * self._at("log_betas", t, xt) + (1 - frac) * true_log_var
        pred_x0 = self._at("sqrt_recip_alphas_cumprod", t, xt) * xt - self._at(
            "sqrt_recipm1_alphas_cumprod", t, xt
        ) * eps_pred
        model_mean = self._at("coef_x0", t, xt) * pred_x0 + self._at("coef_xt", t, xt) * xt

        kl = 0.5 * (
            -1.0
            + model_log_var
            - true_log_var
            + torch.exp(true_log_var - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised to 256 bins (improved DDPM)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
