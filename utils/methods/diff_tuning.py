"""Diff-Tuning ("Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting", Zhong et al. 2024): the
method as one object that every script hands its model family to and gets a loss from (NVlabs/edm's
`loss_fn(net, images, labels)` shape). A script's step:

    diff_tuning = DiffTuning.from_args(args, noise_scheduler, condition_dropout=args.label_dropout)
    loss, parts = diff_tuning(family, model, next(data_iter), next(bank_iter), generator)

A pre-trained model denoises well near the data (small t) and poorly far from it (large t). So each micro-batch
holds `n_bank` memory-bank rows first (retention: samples of the pre-trained model with the family's retention
condition, t ~ xi, mostly small) and then `n_data` downstream rows (adaptation: the new data with their condition,
dropped with probability `condition_dropout` for classifier-free guidance, t ~ psi, mostly large). One forward pass
serves both, and

    loss = L_adapt + retention_weight * L_retain,

each the mean of the family's per-sample loss over its rows. `--method standard` is the same code with no bank
and a uniform psi (tau = 0): plain fine-tuning. The object also opens (or builds) the memory bank with one check of
what the bank recorded and of its real row count, and gives the bank's loader and card fields. The timestep weights
are in `utils.diffusion.timesteps`, the bank's storage in `utils.methods.memory_bank`, and how each model is fed in
`utils.families`.
"""

import argparse
import math
import os

import torch

from ..diffusion.forward_process import forward_process, given_flow_flags, objective_options
from ..diffusion.losses import DenoisingBatch, compose_batch
from ..diffusion.timesteps import WEIGHTINGS, XI_FORMS, CategoricalTimestepSampler
from ..infra import hub
from ..infra.errors import UserError
from ..infra.flags import flag_of
from . import memory_bank

METHODS = ("diff_tuning", "standard")
# DreamBooth's prior preservation as a case of the core: a bank of class images at uniform t for both parts, as many
# bank rows as data rows, bank rows on their own prompt (`train_diff_tuning_text_to_image.py`).
PRIOR_PRESERVATION = "prior_preservation"


def add_diff_tuning_args(p: argparse.ArgumentParser, *, bank_guidance_scale: float | None, bank_batch_size: int,
                         bank_help: str, methods=METHODS, method_help: str = "", bank_size: int = 5000,
                         bank_steps: int | None = 50, bank_steps_help: str = "") -> argparse._ArgumentGroup:
    """The "Diff-Tuning" flag group; defaults are the paper's (a script may choose a bank's size and sampler steps:
    `bank_steps` None lets it decide per method, said in `bank_steps_help`). `bank_help` says how a bank sample is
    made."""
    g = p.add_argument_group("Diff-Tuning")
    g.add_argument("--method", choices=methods, default="diff_tuning",
                   help="diff_tuning: memory bank + psi/xi timesteps; standard: plain fine-tuning (tau = 0, no bank)."
                        + method_help)
    g.add_argument("--tau", type=float, default=1.0, help="Exponent of psi(t) = u^tau, u = (t+1)/T; 0 = uniform.")
    g.add_argument("--xi_form", choices=XI_FORMS, default="paper",
                   help="Retention weights: paper xi = 1 - u^tau; official code xi = (T - t)^tau, psi reversed "
                        "(one step apart from the paper's at tau = 1).")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="power",
                   help="power: psi = u^tau; snr: psi = 1/(1+SNR(t)), xi = 1 - psi (tau unused).")
    g.add_argument("--retention_ratio", type=float, default=0.5,
                   help="Fraction of each batch from the memory bank (paper 0.5, official code 0.2): round(r x "
                        "batch) bank rows, halves up; the official code takes int(r x batch), the same only where "
                        "r x batch is a whole number (0.2 x 32 = 6.4: 6 rows both ways; 0.5 x 5 = 2.5: 3 here, 2 "
                        "there). 0: no bank at all, the data rows at psi timesteps only (the adaptation-only "
                        "ablation).")
    g.add_argument("--retention_weight", type=float, default=1.0,
                   help="loss = L_adapt + w * L_retain (paper 1.0, official code 0.1).")
    g.add_argument("--memory_bank", default=None,
                   help="Memory bank folder: used if it exists, generated there otherwise "
                        f"(default: <output_dir>/memory_bank). {bank_help}")
    g.add_argument("--memory_bank_size", type=int, default=bank_size, help="Samples to generate for a new bank.")
    g.add_argument("--memory_bank_guidance_scale", type=float, default=bank_guidance_scale,
                   help="CFG scale of bank generation." if bank_guidance_scale is not None else
                        "Guidance scale of bank generation (default: the family's: 7.5 CFG; Flux 3.5, its guidance "
                        "embedding).")
    g.add_argument("--memory_bank_inference_steps", type=int, default=bank_steps,
                   help="Sampler steps of bank generation." + bank_steps_help)
    g.add_argument("--memory_bank_batch_size", type=int, default=bank_batch_size,
                   help="Generation batch size (per process).")
    g.add_argument("--push_memory_bank", action="store_true",
                   help="With --push_to_hub, also push the memory bank as a Hub dataset.")
    g.add_argument("--memory_bank_hub_id", default=None,
                   help="Dataset repo id of the pushed bank (default: <hub_model_id>-memory-bank).")
    return g


def num_bank_rows(method: str, retention_ratio: float, batch_size: int, bank_rows_added: bool = False) -> int:
    """Memory-bank rows per micro-batch: round(r * B), halves rounded up, of a batch of B rows; with
    `bank_rows_added` (B counts the data rows, as DreamBooth counts them) round(B r / (1 - r)), so that r is still
    the bank's share of the rows; 0 for standard fine-tuning; B for prior preservation, which (as DreamBooth) adds B
    class rows to B data rows."""
    if method == PRIOR_PRESERVATION:
        return batch_size
    if method != "diff_tuning":
        return 0
    rows = batch_size * retention_ratio / (1 - retention_ratio) if bank_rows_added else retention_ratio * batch_size
    return int(math.floor(rows + 0.5))


def check_diff_tuning_args(args, bank_rows_added: bool = False) -> None:
    """Hyper-parameters of the group that cannot work, caught before anything is loaded (`bank_rows_added`: the
    script's --train_batch_size counts data rows; `num_bank_rows`)."""
    if args.tau < 0:
        raise UserError(f"{flag_of(args, 'tau')} must be >= 0, got {args.tau}")
    if not 0 <= args.retention_ratio < 1:
        raise UserError(f"{flag_of(args, 'retention_ratio')} must be in [0, 1), got {args.retention_ratio}")
    if args.retention_weight < 0:
        raise UserError(f"{flag_of(args, 'retention_weight')} must be >= 0, got {args.retention_weight}")
    for name in ("memory_bank_size", "memory_bank_batch_size", "memory_bank_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"{flag_of(args, name)} must be >= 1, got {getattr(args, name)}")
    if args.method != "diff_tuning":
        return
    n_bank = num_bank_rows(args.method, args.retention_ratio, args.train_batch_size, bank_rows_added)
    if n_bank == 0 and args.retention_ratio > 0:  # an explicit 0 is the adaptation-only ablation: no bank
        raise UserError(f"--retention_ratio {args.retention_ratio} x --train_batch_size {args.train_batch_size} "
                        "rounds to 0 memory-bank samples; raise either, or use --method standard")
    if n_bank == args.train_batch_size and not bank_rows_added:
        raise UserError("--retention_ratio x --train_batch_size leaves no downstream samples in the batch")
    if args.xi_form == "paper" and args.weighting == "power" and args.tau == 0:
        raise UserError("--tau 0 makes xi = 1 - u^0 zero everywhere (no retention); use --method standard")


class DiffTuningTimesteps:
    """The timestep indices of one micro-batch: xi for the bank rows (first), psi for the downstream rows, over the
    forward process's discrete timesteps (`utils.diffusion.forward_process`: DDPM's t, or flow matching's sigmas with
    its base density)."""

    def __init__(self, process, method: str, tau: float, xi_form: str, weighting: str):
        self.retain = None
        if method == "diff_tuning":
            self.adapt = CategoricalTimestepSampler(process.timestep_weights("adaptation", tau, xi_form, weighting))
            self.retain = CategoricalTimestepSampler(process.timestep_weights("retention", tau, xi_form, weighting))
        else:  # standard fine-tuning, and DreamBooth's class images: the process's own density, whatever --weighting
            self.adapt = CategoricalTimestepSampler(process.timestep_weights("uniform"))
            if method == PRIOR_PRESERVATION:
                self.retain = self.adapt

    def sample(self, n_bank: int, n_data: int, generator: torch.Generator, device) -> torch.Tensor:
        data = self.adapt.sample(n_data, generator, device)
        if n_bank == 0:
            return data
        return torch.cat([self.retain.sample(n_bank, generator, device), data])


class DiffTuning:
    """The method for every model family. `family` (utils.families) says how rows feed its model; this object
    decides which rows, timesteps and noise a step uses and how their losses combine."""

    def __init__(self, scheduler, *, method: str = "diff_tuning", tau: float = 1.0, xi_form: str = "paper",
                 weighting: str = "power", retention_ratio: float = 0.5, retention_weight: float = 1.0,
                 batch_size: int = 32, condition_dropout: float = 0.0, process=None, bank_dir: str = "memory_bank",
                 bank_source: str = "generated for this run", push_bank: bool = False, bank_hub_id: str | None = None,
                 bank_flag: str = "--memory_bank", bank_rows_added: bool = False):
        # the training noise scheduler, and the forward process it defines (DDPM, or flow matching with `process`
        # built from diffusers' --weighting_scheme flags: utils.diffusion.forward_process)
        self.scheduler, self.method = scheduler, method
        self.process = process or forward_process(scheduler)
        # `batch_size` rows per micro-batch, bank rows included, or (`bank_rows_added`) data rows, bank rows added
        self.n_bank = num_bank_rows(method, retention_ratio, batch_size, bank_rows_added)
        self.n_data = batch_size if method == PRIOR_PRESERVATION or bank_rows_added else batch_size - self.n_bank
        self.retention_weight, self.condition_dropout = retention_weight, condition_dropout
        self.settings = {"tau": tau, "xi_form": xi_form, "weighting": weighting, "retention_ratio": retention_ratio,
                         "retention_weight": retention_weight}
        self.timesteps = DiffTuningTimesteps(self.process, method, tau, xi_form, weighting)
        # the bank: its folder (the user's --memory_bank or the run's own), what the card calls it, the push
        self.bank_dir, self.bank_source, self.bank_flag = bank_dir, bank_source, bank_flag  # flag: as the user typed it
        self.push_bank, self.bank_hub_id = push_bank, bank_hub_id
        self.bank = self.bank_record = self.bank_size = None

    @classmethod
    def from_args(cls, args, scheduler, condition_dropout: float, bank_rows_added: bool = False,
                  bank_dir: str | None = None, bank_source: str | None = None,
                  flow_defaults: dict | None = None) -> "DiffTuning":
        """From the "Diff-Tuning" flag group (`add_diff_tuning_args`), --train_batch_size, and where the script has
        them the flow-matching group (`add_flow_matching_args`) and the objective group (`add_objective_args`);
        `bank_dir` / `bank_source`: another bank folder than --memory_bank's and what the card calls it;
        `flow_defaults`: the family's defaults of the flow-matching flags left out (Flux: weighting_scheme none)."""
        process_options = {**(flow_defaults or {}), **given_flow_flags(args), **objective_options(args)}
        return cls(scheduler, method=args.method, tau=args.tau, xi_form=args.xi_form, weighting=args.weighting,
                   retention_ratio=args.retention_ratio, retention_weight=args.retention_weight,
                   batch_size=args.train_batch_size, condition_dropout=condition_dropout,
                   process=forward_process(scheduler, **process_options),
                   bank_dir=bank_dir or args.memory_bank or os.path.join(args.output_dir, "memory_bank"),
                   bank_source=bank_source or args.memory_bank_hub_id or args.memory_bank or "generated for this run",
                   push_bank=args.push_memory_bank, bank_hub_id=args.memory_bank_hub_id,
                   bank_flag=flag_of(args, "memory_bank"), bank_rows_added=bank_rows_added)

    @property
    def uses_bank(self) -> bool:
        return self.n_bank > 0

    # ---- the memory bank: its folder and record, held once
    def check_bank(self, record: dict, size: int, num_processes: int) -> None:
        """Before any weights load: the bank folder is a bank made for this run (`record`: what it must have recorded,
        the family's `BankPlan.record`) holding at least one batch of bank rows per process, or a new folder for one
        of `size` rows. Holds the record and size for `open_bank`."""
        self.bank_record, self.bank_size = record, size
        if self.uses_bank:
            memory_bank.check_memory_bank(self.bank_dir, record, min_rows=self.n_bank * num_processes,
                                          size_if_generated=size, flag=self.bank_flag)

    def open_bank(self, accelerator, sampler, batch_size: int, seed: int):
        """The bank, generated by all processes with the pre-trained weights unless it exists, then checked as in
        `check_bank`. Returns a `datasets.Dataset`, or None for standard fine-tuning."""
        if not self.uses_bank:
            return None
        self.bank = memory_bank.build_memory_bank(accelerator, sampler, self.bank_dir, self.bank_size,
                                                  self.bank_record, batch_size, seed)
        memory_bank.check_memory_bank(self.bank_dir, self.bank_record, min_rows=self.n_bank * accelerator.num_processes,
                                      flag=self.bank_flag)
        return self.bank

    def bank_loader(self, family, workers: dict):
        """`n_bank` bank rows per micro-batch, reshuffled every pass, read through the family's view of the bank
        (None without a bank)."""
        if self.bank is None:
            return None
        rows, collate_fn = family.bank_view(self.bank)
        return torch.utils.data.DataLoader(rows, batch_size=self.n_bank, shuffle=True, drop_last=True,
                                           collate_fn=collate_fn, **workers)

    # ---- the model card and the push
    @property
    def tag(self) -> str:
        """The card's method tag."""
        return {"diff_tuning": "diff-tuning", "standard": "standard-fine-tuning",
                PRIOR_PRESERVATION: "dreambooth"}[self.method]

    def card_text(self, bank_rows: str = "samples of the pre-trained model") -> str:
        """What the method did, for the card's description (`bank_rows`: what a bank row is, in words)."""
        if self.method == "diff_tuning" and not self.uses_bank:
            return ("Diff-Tuning's adaptation part alone (--retention_ratio 0, no memory bank): the new data at "
                    "timesteps weighted to large t.")
        if self.method == "diff_tuning":
            return (f"Diff-Tuning ([Zhong et al., 2024](https://arxiv.org/abs/2406.00773)) mixes each batch with "
                    f"{bank_rows} at small timesteps, to retain its knowledge near the data, and trains on the new "
                    "data mostly at large timesteps.")
        if self.method == PRIOR_PRESERVATION:
            return ("Prior preservation ([Ruiz et al., 2023](https://arxiv.org/abs/2208.12242)) mixes each batch "
                    "with class images of the pre-trained model on their own prompt.")
        return "The new data was trained with the ordinary uniform-timestep denoising loss."

    def card_fields(self) -> dict:
        """The method's hyper-parameters and the bank's recorded generation settings, for the model card."""
        if not self.uses_bank:
            return {}
        info = memory_bank.bank_info(self.bank_dir)
        fields = {**self.settings, "memory_bank": self.bank_source, "memory_bank_size": info["size"],
                  "memory_bank_guidance_scale": info.get("guidance_scale"),
                  "memory_bank_inference_steps": info.get("num_inference_steps")}
        if "prompt" in info:
            fields["memory_bank_prompt"] = info["prompt"]
        return fields

    def push(self, folder: str, repo_id: str, token, private: bool, logger) -> str:
        """Push the output folder to the Hub and, with --push_memory_bank, the bank as a Hub dataset with its card
        and record (default repo: <repo_id>-memory-bank). Returns the model's repo id."""
        repo = hub.push_folder(folder, repo_id, token, private)
        logger.info(f"pushed to https://huggingface.co/{repo}")
        if self.push_bank and self.uses_bank:
            bank_repo = memory_bank.push_memory_bank(self.bank_dir, self.bank_hub_id or f"{repo}-memory-bank",
                                                     token, private)
            logger.info(f"pushed the memory bank to https://huggingface.co/datasets/{bank_repo}")
        return repo

    # ---- one micro-batch
    @torch.no_grad()
    def batch(self, family, data: dict, bank: dict | None, generator) -> DenoisingBatch:
        """Bank rows first (retention condition, t ~ xi), then downstream rows (condition dropped with probability
        `condition_dropout`, t ~ psi); x_0, the noise, the noisy input and the target. Every random choice comes
        from `generator` in a fixed order, so a resumed run draws exactly what an uninterrupted one would."""
        drop = torch.rand(self.n_data, generator=generator, device=family.device) < self.condition_dropout
        rows = family.drop_condition(family.rows(data, generator), drop)
        n_bank = 0
        if bank is not None:
            bank_rows = family.bank_rows(bank, generator)
            n_bank, rows = len(bank_rows), bank_rows.then(rows)
        index = self.timesteps.sample(n_bank, len(rows) - n_bank, generator, family.device)
        return compose_batch(self.process, family, family.x0(rows.x, generator), rows.cond, index, generator,
                             n_bank=n_bank)

    def __call__(self, family, net, data: dict, bank: dict | None, generator) -> tuple[torch.Tensor, dict]:
        """loss = L_adapt + retention_weight * L_retain over the family's per-sample losses; returns the loss and
        its parts for logging (L_retain is 0 without bank rows)."""
        b = self.batch(family, data, bank, generator)
        per_sample = family.loss(net, b)
        if b.loss_weights is not None:  # flow matching's cosmap / sigma_sqrt
            per_sample = per_sample * b.loss_weights
        loss_adapt = per_sample[b.n_bank:].mean()
        loss_retain = per_sample[:b.n_bank].mean() if b.n_bank else torch.zeros_like(loss_adapt)
        loss = loss_adapt + self.retention_weight * loss_retain
        return loss, {"loss_adapt": loss_adapt, "loss_retain": loss_retain}
