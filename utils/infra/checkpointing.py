"""Resumable training state: `checkpoint-<step>` folders written by accelerate, rotation, resume, and the
per-step random generator that makes a resumed run draw exactly what an uninterrupted one would."""

import json
import os
import shutil

import torch

from .errors import UserError

RUN_FILE = "training_run.json"  # what a checkpoint belongs to: the base model and the flags that shape the weights


WRITER = ("script", "family")  # what wrote a checkpoint: facts of the run record, not flags


def run_identity(args, flags, script: str | None = None, family: str | None = None) -> dict:
    """The values of `flags` (each script names those that decide which weights a checkpoint holds), and the script
    and model family that write the checkpoint; a resume with other values is refused. A script may add facts that
    are no flag under a name of words ("num classes")."""
    writer = {k: v for k, v in (("script", script), ("family", family)) if v is not None}
    return {**writer, **{k: getattr(args, k) for k in flags}}


def step_generator(seed: int, process_index: int, micro_step: int, device) -> torch.Generator:
    """A generator for one micro-step, derived from (seed, rank, step) alone: nothing to save, nothing to
    restore, and each rank draws differently."""
    # hash() of a tuple of ints is stable across runs (no hash randomisation for ints).
    return torch.Generator(device).manual_seed(hash((seed, process_index, micro_step)) & (2**63 - 1))


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-<step> folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d.split("-", 1)[1]))]


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """`latest` -> the newest checkpoint in output_dir (None if there is none); a path must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume_from_checkpoint):
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist")
    return resume_from_checkpoint


def checkpoint_step(path: str) -> int:
    return int(os.path.basename(path.rstrip("/")).split("-", 1)[1])


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, save_extra=None,
                    identity: dict | None = None) -> str:
    """Save the full training state as checkpoint-<step>, keeping at most `total_limit` checkpoints.

    The state is written to a temporary folder and renamed, so a kill never leaves a checkpoint that looks
    complete but is not, and older checkpoints are rotated out only after that."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a kill's left-over in this script's own output folder
    accelerator.save_state(tmp)
    if save_extra is not None:  # e.g. a loadable model folder beside accelerate's state
        save_extra(tmp)
    if identity is not None:
        with open(os.path.join(tmp, RUN_FILE), "w") as f:
            json.dump(identity, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    # Old checkpoints go only once the new one is complete: a kill during the save keeps the previous one.
    if total_limit is not None:
        others = [c for c in list_checkpoints(output_dir) if c != path]
        for stale in others[: max(0, len(others) - (total_limit - 1))]:
            shutil.rmtree(stale)
    return path


def check_identity(path: str, identity: dict | None, log) -> None:
    """Refuse a checkpoint made for another model or another kind of run (one line, before loading it)."""
    file = os.path.join(path, RUN_FILE)
    if identity is None:
        return
    if not os.path.exists(file):
        log.warning(f"{path} does not record which model it belongs to (an older checkpoint); resuming anyway")
        return
    with open(file) as f:
        recorded = json.load(f)
    if any(k in recorded and recorded[k] != identity.get(k) for k in WRITER if k in identity):
        def who(record):
            return f"{record.get('script')}" + (f" ({record['family']})" if record.get("family") else "")
        raise UserError(f"checkpoint {path} was written by {who(recorded)}; this run is {who(identity)}: resume it "
                        "with that script and model, or use a new --output_dir")
    for key, value in identity.items():
        if key in recorded and recorded[key] != value:
            what = key if " " in key else f"--{key}"  # a flag, or a fact of the data named in words
            raise UserError(f"checkpoint {path} was made with {what} {recorded[key]!r}, this run has {value!r}; "
                            "resume with the same flags and data, or use a new --output_dir")


def check_resume(output_dir: str, resume_from_checkpoint: str | None, identity: dict, log) -> None:
    """Before anything expensive (a memory bank, weights): the checkpoint a resume would load exists and belongs
    to this run (`check_identity`)."""
    path = resolve_resume(output_dir, resume_from_checkpoint)
    if path is not None:
        check_identity(path, identity, log)


def resume(accelerator, output_dir: str, resume_from_checkpoint: str | None, log, ema=None,
           identity: dict | None = None) -> int:
    """Load the checkpoint `--resume_from_checkpoint` names (`latest`: the newest in output_dir, if any) and return
    its global step; 0 when there is nothing to resume. `ema` (registered for checkpointing) goes back to the
    accelerator's device: accelerate loads custom states on the CPU."""
    path = resolve_resume(output_dir, resume_from_checkpoint)
    if path is None:
        if resume_from_checkpoint:
            log.info("no checkpoint to resume from; starting a new run")
        return 0
    check_identity(path, identity, log)
    try:
        accelerator.load_state(path)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot resume from {path}: it is corrupt or incomplete ({type(e).__name__}: {first})") from e
    if ema is not None:
        ema.to(accelerator.device)
    log.info(f"resumed from {path} at step {checkpoint_step(path)}")
    return checkpoint_step(path)
