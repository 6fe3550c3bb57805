"""Diff-Tuning ("Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting", Zhong et al. 2024): the
method's pieces, shared by every script that fine-tunes with it (DiT, ControlNet).

A pre-trained model denoises well near the data (small t) and poorly far from it (large t). So each micro-batch
holds `n_bank` memory-bank rows first (retention: samples of the pre-trained model, unconditional, t ~ xi, mostly
small) and then `n_data` downstream rows (adaptation: the new data, t ~ psi, mostly large). One forward pass serves
both, and

    loss = L_adapt + retention_weight * L_retain,

each the mean of the per-sample denoising loss over its rows. `--method standard` is the same code with no bank
and a uniform psi (tau = 0): plain fine-tuning. The timestep weights are in `utils.timesteps`; the model call (how a
DiT or a ControlNet is fed) stays in each script.
"""

import argparse
import math

import torch

from .errors import UserError
from .timesteps import WEIGHTINGS, XI_FORMS, CategoricalTimestepSampler, adaptation_weights, retention_weights

METHODS = ("diff_tuning", "standard")


def add_diff_tuning_args(p: argparse.ArgumentParser, *, bank_guidance_scale: float, bank_batch_size: int,
                         bank_help: str) -> argparse._ArgumentGroup:
    """The "Diff-Tuning" flag group; defaults are the paper's. `bank_help` says how a bank sample is made."""
    g = p.add_argument_group("Diff-Tuning")
    g.add_argument("--method", choices=METHODS, default="diff_tuning",
                   help="diff_tuning: memory bank + psi/xi timesteps; standard: plain fine-tuning (tau = 0, no bank).")
    g.add_argument("--tau", type=float, default=1.0, help="Exponent of psi(t) = u^tau, u = (t+1)/T; 0 = uniform.")
    g.add_argument("--xi_form", choices=XI_FORMS, default="paper",
                   help="Retention weights: paper xi = 1 - u^tau, official code xi = (1-u)^tau (equal at tau = 1).")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="power",
                   help="power: psi = u^tau; snr: psi = 1/(1+SNR(t)), xi = 1 - psi (tau unused).")
    g.add_argument("--retention_ratio", type=float, default=0.5,
                   help="Fraction of each batch from the memory bank (paper 0.5, official code 0.2).")
    g.add_argument("--retention_weight", type=float, default=1.0,
                   help="loss = L_adapt + w * L_retain (paper 1.0, official code 0.1).")
    g.add_argument("--memory_bank", default=None,
                   help="Memory bank folder: used if it exists, generated there otherwise "
                        f"(default: <output_dir>/memory_bank). {bank_help}")
    g.add_argument("--memory_bank_size", type=int, default=5000, help="Samples to generate for a new bank.")
    g.add_argument("--memory_bank_guidance_scale", type=float, default=bank_guidance_scale,
                   help="CFG scale of bank generation.")
    g.add_argument("--memory_bank_inference_steps", type=int, default=50, help="DDIM steps of bank generation.")
    g.add_argument("--memory_bank_batch_size", type=int, default=bank_batch_size,
                   help="Generation batch size (per process).")
    return g


def num_bank_rows(method: str, retention_ratio: float, batch_size: int) -> int:
    """Memory-bank rows per micro-batch: round(r * B), halves rounded up; 0 for standard fine-tuning."""
    return int(math.floor(retention_ratio * batch_size + 0.5)) if method == "diff_tuning" else 0


def check_diff_tuning_args(args) -> None:
    """Hyper-parameters of the group that cannot work, caught before anything is loaded."""
    if args.tau < 0:
        raise UserError(f"--tau must be >= 0, got {args.tau}")
    if not 0 <= args.retention_ratio < 1:
        raise UserError(f"--retention_ratio must be in [0, 1), got {args.retention_ratio}")
    if args.retention_weight < 0:
        raise UserError(f"--retention_weight must be >= 0, got {args.retention_weight}")
    for name in ("memory_bank_size", "memory_bank_batch_size", "memory_bank_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.method != "diff_tuning":
        return
    n_bank = num_bank_rows(args.method, args.retention_ratio, args.train_batch_size)
    if n_bank == 0:
        raise UserError(f"--retention_ratio {args.retention_ratio} x --train_batch_size {args.train_batch_size} "
                        "rounds to 0 memory-bank samples; raise either, or use --method standard")
    if n_bank == args.train_batch_size:
        raise UserError("--retention_ratio x --train_batch_size leaves no downstream samples in the batch")
    if args.xi_form == "paper" and args.weighting == "power" and args.tau == 0:
        raise UserError("--tau 0 makes xi = 1 - u^0 zero everywhere (no retention); use --method standard")


class DiffTuningTimesteps:
    """The timesteps of one micro-batch: xi for the bank rows (first), psi for the downstream rows."""

    def __init__(self, num_timesteps: int, method: str, tau: float, xi_form: str, weighting: str, alphas_cumprod):
        tau = tau if method == "diff_tuning" else 0.0  # standard fine-tuning: uniform t
        self.adapt = CategoricalTimestepSampler(adaptation_weights(num_timesteps, tau, weighting, alphas_cumprod))
        self.retain = CategoricalTimestepSampler(retention_weights(
            num_timesteps, tau, xi_form, weighting, alphas_cumprod)) if method == "diff_tuning" else None

    def sample(self, n_bank: int, n_data: int, generator: torch.Generator, device) -> torch.Tensor:
        data = self.adapt.sample(n_data, generator, device)
        if n_bank == 0:
            return data
        return torch.cat([self.retain.sample(n_bank, generator, device), data])


class DiffTuningLoss:
    """loss = L_adapt + w * L_retain from per-sample losses whose first `n_bank` rows are memory-bank rows.
    Returns the loss and its parts for logging (L_retain is 0 without bank rows)."""

    def __init__(self, retention_weight: float = 1.0):
        self.retention_weight = retention_weight

    def __call__(self, per_sample: torch.Tensor, n_bank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_adapt = per_sample[n_bank:].mean()
        loss_retain = per_sample[:n_bank].mean() if n_bank else torch.zeros_like(loss_adapt)
        loss = loss_adapt + self.retention_weight * loss_retain
        return loss, {"loss_adapt": loss_adapt, "loss_retain": loss_retain}
