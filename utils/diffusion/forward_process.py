"""The forward (noising) processes a method trains against: DDPM's (`DDPMScheduler`: alphas_cumprod over integer
timesteps t = 0..T-1) and rectified flow's (`FlowMatchEulerDiscreteScheduler`, SD3: x = (1 - sigma) x_0 + sigma eps
over the scheduler's N discrete sigmas). Each answers, for indices i of its discrete timesteps: Diff-Tuning's
weights of them (`timestep_weights`), the noisy input, what the model is given as its timestep, and per-sample loss
weights. A method draws indices and never asks which process it has.

DDPM: index t is the timestep; the noise level is u = (t+1)/T (`utils.diffusion.timesteps`). Flow matching: index i
is drawn as diffusers' SD3 scripts draw it (`--weighting_scheme` through `compute_density_for_timestep_sampling`,
i = int(u N)); the model is given `scheduler.timesteps[i]` (sigma_i x 1000, after the scheduler's shift), the noise
level is sigma_i, and the loss is weighted by `compute_loss_weighting_for_sd3` (cosmap, sigma_sqrt; 1 otherwise).
"""

import torch

from ..infra.errors import UserError
from .timesteps import (
    FLOW_WEIGHTING_SCHEMES,
    adaptation_weights,
    flow_base_probabilities,
    flow_matching_weights,
    retention_weights,
)

FLOW_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")  # add_flow_matching_args's
ROLES = ("uniform", "adaptation", "retention")  # uniform: the process's own base density (standard fine-tuning)


class DDPMProcess:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (`scheduler.add_noise`), t given to the model as it is.
    diffusers' example options: `noise_offset` adds offset x N(0, 1) per sample and channel to the noise (Cross
    Labs' offset noise, `--noise_offset`); `snr_gamma` weights each sample by Min-SNR-gamma (`--snr_gamma`,
    `utils.diffusion.losses.min_snr_weights`), on top of whatever density drew its timestep."""

    def __init__(self, scheduler, snr_gamma: float | None = None, noise_offset: float = 0.0):
        self.scheduler, self.snr_gamma, self.noise_offset = scheduler, snr_gamma, noise_offset
        self.num_timesteps = scheduler.config.num_train_timesteps

    def draw_noise(self, x0: torch.Tensor, generator) -> torch.Tensor:
        """The noise of a batch (drawn from `generator`: a resumed run draws the same)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((*x0.shape[:2], *([1] * (x0.ndim - 2))),
                                                            generator=generator, device=x0.device)
        return noise

    def timestep_weights(self, role: str, tau: float = 1.0, xi_form: str = "paper", weighting: str = "power"):
        """Unnormalised weights of t = 0..T-1: uniform, psi (adaptation) or xi (retention)."""
        if role == "uniform":
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        if role == "adaptation":
            return adaptation_weights(self.num_timesteps, tau, weighting, self.scheduler.alphas_cumprod)
        return retention_weights(self.num_timesteps, tau, xi_form, weighting, self.scheduler.alphas_cumprod)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, index)

    @staticmethod
    def index_from_data_side(k: torch.Tensor) -> torch.Tensor:
        """The index of the k-th least noisy timestep (DDPM: t = k)."""
        return k

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def loss_weights(self, index: torch.Tensor) -> torch.Tensor | None:
        if not self.snr_gamma:
            return None
        from .losses import min_snr_weights

        return min_snr_weights(self.scheduler, index, self.snr_gamma).float()


class FlowMatchingProcess:
    """Rectified flow as SD3 trains: x_sigma = (1 - sigma) x_0 + sigma eps at the scheduler's training sigmas (index
    0 is the noisiest, as `scheduler.timesteps` runs from T down), the target noise - x_0 (the family's)."""

    def __init__(self, scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise UserError(f"--weighting_scheme must be one of {', '.join(FLOW_WEIGHTING_SCHEMES)}, got "
                            f"{weighting_scheme!r}")
        if logit_std <= 0:
            raise UserError(f"--logit_std must be > 0, got {logit_std}")
        self.scheduler, self.weighting_scheme = scheduler, weighting_scheme
        self.num_timesteps = len(scheduler.timesteps)
        self.sigmas = scheduler.sigmas[:self.num_timesteps].to(torch.float32)  # the last sigma (0) is not trained
        self.timesteps = scheduler.timesteps.to(torch.float32)
        self.base = flow_base_probabilities(self.num_timesteps, weighting_scheme, logit_mean, logit_std, mode_scale)

    def timestep_weights(self, role: str, tau: float = 1.0, xi_form: str = "paper", weighting: str = "power"):
        """Unnormalised weights of the N indices: the base density, times psi(sigma) or xi(sigma)."""
        if weighting != "power":
            raise UserError(f"--weighting {weighting} is defined on DDPM's alphas_cumprod; flow-matching models take "
                            "--weighting power (psi = sigma^tau), with --weighting_scheme for the base density")
        if role == "uniform":
            return self.base.clone()
        return flow_matching_weights(self.sigmas, self.base, tau, role, xi_form)

    @staticmethod
    def draw_noise(x0: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(x0.shape, generator=generator, device=x0.device)

    def _sigma(self, index: torch.Tensor, ndim: int, like: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas.to(like.device)[index.to(like.device)]
        return sigma.reshape(-1, *([1] * (ndim - 1))).to(like.dtype)

    def index_from_data_side(self, k: torch.Tensor) -> torch.Tensor:
        """The index of the k-th smallest sigma (index 0 is the noisiest)."""
        return self.num_timesteps - 1 - k

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(index, x0.ndim, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(index.device)[index]

    def loss_weights(self, index: torch.Tensor) -> torch.Tensor | None:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.weighting_scheme not in ("cosmap", "sigma_sqrt"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigmas.to(index.device)[index]).float()


def forward_process(scheduler, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                    logit_std: float = 1.0, mode_scale: float = 1.29, snr_gamma: float | None = None,
                    noise_offset: float = 0.0):
    """The process a training scheduler defines (the flow-matching settings are diffusers' SD3 flags and apply to
    flow-matching schedulers only; `snr_gamma` and `noise_offset`, their epsilon/v examples' flags, to DDPM only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if snr_gamma or noise_offset:
            raise UserError("--snr_gamma and --noise_offset apply to epsilon and v-prediction models (as diffusers' "
                            "examples); a flow-matching model takes --weighting_scheme")
        return FlowMatchingProcess(scheduler, weighting_scheme, logit_mean, logit_std, mode_scale)
    return DDPMProcess(scheduler, snr_gamma, noise_offset)


def add_flow_matching_args(p) -> None:
    """diffusers' flags of its flow-matching scripts (train_dreambooth_lora_sd3.py, _flux.py). Their defaults
    (logit_normal, or a family's `flow_defaults`; 0, 1, 1.29) apply where left out, so a script can refuse them
    given to a DDPM model (`given_flow_flags`)."""
    g = p.add_argument_group("flow matching (SD3 and Flux; diffusers' flags and defaults)")
    g.add_argument("--weighting_scheme", choices=FLOW_WEIGHTING_SCHEMES, default=None,
                   help="Base timestep density (logit_normal, mode) or loss weighting (cosmap, sigma_sqrt) of "
                        "flow-matching training; Diff-Tuning multiplies the base density by psi(sigma) or xi(sigma) "
                        "(default: logit_normal for SD3, none for Flux, as diffusers' scripts for each).")
    g.add_argument("--logit_mean", type=float, default=None, help="Mean of the logit_normal scheme (default: 0).")
    g.add_argument("--logit_std", type=float, default=None,
                   help="Standard deviation of the logit_normal scheme (default: 1).")
    g.add_argument("--mode_scale", type=float, default=None, help="Scale of the mode scheme (default: 1.29).")
    g.add_argument("--precondition_outputs", type=int, choices=(0, 1), default=None,
                   help="1: the loss compares the x_0 estimate x_sigma - sigma v with x_0 (EDM's preconditioning; "
                        "the flow loss weighted by sigma^2); 0: v with noise - x_0 (default: 1, as diffusers' SD3 "
                        "scripts).")


def add_objective_args(p) -> None:
    """diffusers' objective flags of its epsilon/v-prediction examples (train_text_to_image_lora.py), their names,
    meanings and defaults; None means not given (a flow-matching family refuses a given one)."""
    g = p.add_argument_group("objective (epsilon/v-prediction models; diffusers' flags and defaults)")
    g.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                   help="Train this target instead of the scheduler's prediction_type (the saved pipeline's "
                        "scheduler then records it; default: the scheduler's).")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weights (Hang et al. 2023; 5.0 recommended), per sample on top of the "
                        "method's timestep density (default: off).")
    g.add_argument("--noise_offset", type=float, default=None,
                   help="Offset noise: adds offset x N(0, 1) per sample and channel to the noise (default: 0).")


def objective_options(args) -> dict:
    """The objective flags given (as keyword arguments of `forward_process`)."""
    return {k: getattr(args, k) for k in ("snr_gamma", "noise_offset") if getattr(args, k, None) is not None}


def given_flow_flags(args) -> dict:
    """The flow-matching flags given on the command line (as keyword arguments of `forward_process`)."""
    return {k: getattr(args, k) for k in FLOW_FLAGS if getattr(args, k, None) is not None}
