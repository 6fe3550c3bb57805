"""Memory banks: samples of the pre-trained model, stored as a `datasets` dataset (Diff-Tuning's retention data).

What a row holds depends on the family's bank sampler (`utils.families`): the generated `image` (PNG), what
generated it (`class_label` for DiT, the `text` prompt for Stable Diffusion) and its `seed`, the control annotated
from it for ControlNet banks (`conditioning_image`), and the VAE posterior of the image (`latent_moments`; DiT banks
also of its mirror image, `latent_moments_flipped`). Moments are mean and log-variance stacked on the channel axis
(diffusers' `latent_dist.parameters`, unscaled); training samples a latent from them exactly as
`vae.encode(x).latent_dist.sample()` would, so it never runs the VAE on the bank.

Generation is sharded: shard k holds samples k*B .. (k+1)*B-1, each written atomically to `<bank>.partial/`, so an
interrupted run keeps what it wrote and continues; sample i always uses seed + i, so the bank does not depend on
the batch size or the number of processes. The finished bank is moved into place in one rename, with
`memory_bank.json`: the family, the base model and the generator's settings, which a training run checks
(`check_memory_bank`) before it uses the bank. Build banks ahead of time with `generate_memory_bank.py`.
"""

import json
import logging
import math
import os
import shutil
import time

import datasets
from huggingface_hub import DatasetCard, DatasetCardData
from tqdm.auto import tqdm

from ..infra import hub
from ..infra.errors import UserError
from ..infra.outputs import created_by, mark, replace_dir, work_dir, write_json_atomically

CONFIG_NAME = "memory_bank.json"
logger = logging.getLogger(__name__)
# marks the folders it writes (utils.infra.outputs): only those are ever replaced or removed. The name is part of the
# stored format (banks and shards of earlier versions carry it), not a module path.
SCRIPT = "utils.memory_bank"


def shard_dir_of(bank_dir: str) -> str:
    return bank_dir.rstrip("/") + ".partial"


def check_bank_dir(bank_dir: str, flag: str = "--memory_bank") -> None:
    """Before any generation: the bank folder is a finished bank (reused), or new, or empty; and its shard folder,
    if any, was left by an interrupted generation of this module. Anything else is the user's: refused."""
    if os.path.exists(bank_dir) and not os.path.isdir(bank_dir):
        raise UserError(f"{flag} {bank_dir} is a file, not a memory bank folder")
    if os.path.isdir(bank_dir) and os.listdir(bank_dir) and not is_memory_bank(bank_dir):
        raise UserError(f"{flag} {bank_dir} exists but is not a memory bank (no {CONFIG_NAME}); name a finished bank "
                        "or a new folder")
    shards = shard_dir_of(bank_dir)
    if os.path.exists(shards) and not is_memory_bank(bank_dir) and created_by(shards) != SCRIPT:
        raise UserError(f"{shards} exists and was not written by a memory-bank generation; move it away")


def bank_prompts_from_file(path: str) -> list[str]:
    """A text-to-image bank's prompts: one a line, blank lines skipped."""
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} is not a file")
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt (one a line)")
    return prompts


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cost_note(size: int, steps: int, guided: bool, train_passes: int) -> str:
    """A new bank's cost against the training run's, in denoiser passes, said before it is generated: size x steps
    (x 2 when `guided`: classifier-free guidance) against steps x rows x 3 (a forward and a backward pass counted as
    3)."""
    passes = size * steps * (2 if guided else 1)
    cfg = " x 2 (guidance)" if guided else ""
    return (f"memory bank to generate: {size:,} samples x {steps} steps{cfg} = {passes:,} denoiser passes, "
            f"{passes / max(train_passes, 1):.2g} x the training run's {train_passes:,} (steps x rows x 3 for "
            "forward and backward); a bank built once ahead with generate_memory_bank.py serves every run")


def image_files(folder: str) -> list[str]:
    """The images directly in `folder`, sorted by name (DreamBooth's class-image folder)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))


def is_memory_bank(path) -> bool:
    return path is not None and os.path.exists(os.path.join(path, CONFIG_NAME))


def generate_shards(
    sampler,
    bank_dir: str,
    size: int,
    batch_size: int = 32,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
) -> None:
    """Generate this process's shards (k = process_index, process_index + num_processes, ...), skipping done ones.
    `sampler(seeds)` gives the columns of the rows with those seeds (`DiTBankSampler`, `ControlBankSampler`)."""
    if size < 1 or batch_size < 1:
        raise UserError(f"memory bank size and batch size must be >= 1, got {size} and {batch_size}")
    check_bank_dir(bank_dir)
    shard_dir = shard_dir_of(bank_dir)
    mark(shard_dir, SCRIPT)

    mine = list(range(process_index, math.ceil(size / batch_size), num_processes))
    todo = [k for k in mine if not os.path.exists(os.path.join(shard_dir, f"shard-{k:06d}"))]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="memory bank", disable=not show_progress)
    was_training = sampler.model.training
    sampler.model.eval()  # in train mode every DiT block would drop labels at random
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar for the bank, not one per shard written
    started = time.perf_counter()
    for i, k in enumerate(todo):
        seeds = list(range(seed + k * batch_size, seed + min((k + 1) * batch_size, size)))
        shard = datasets.Dataset.from_dict(sampler(seeds), features=sampler.features)
        path = os.path.join(shard_dir, f"shard-{k:06d}")
        shard.save_to_disk(path + ".tmp")
        os.replace(path + ".tmp", path)
        bar.update(1)
        if i == 0 and len(todo) > 1 and show_progress:  # a large bank takes hours before step 1: say so early
            remaining = (time.perf_counter() - started) * (len(todo) - 1)
            logger.info(f"memory bank: {len(todo) - 1} more shard(s) of {batch_size} samples on this process, about "
                        f"{remaining / 60:.0f} min; build it ahead once with generate_memory_bank.py to reuse it")
    bar.close()
    if bars_were_on:
        datasets.enable_progress_bars()
    sampler.model.train(was_training)


def finalize(bank_dir: str, size: int, info: dict) -> None:
    """Concatenate the shards into the bank folder (main process only), then delete the shards."""
    shard_dir = shard_dir_of(bank_dir)
    shards = sorted(d for d in os.listdir(shard_dir) if d.startswith("shard-") and not d.endswith(".tmp"))
    bank = datasets.concatenate_datasets([datasets.load_from_disk(os.path.join(shard_dir, d)) for d in shards])
    if len(bank) != size:
        raise RuntimeError(f"memory bank shards hold {len(bank)} samples, expected {size}")
    work = work_dir(bank_dir, SCRIPT)
    tmp = os.path.join(work, "bank")
    bank.save_to_disk(tmp)
    mark(tmp, SCRIPT)
    write_json_atomically(os.path.join(tmp, CONFIG_NAME), {**info, "size": size})
    replace_dir(tmp, bank_dir, SCRIPT)  # the config file marks a complete bank; it appears only now
    shutil.rmtree(work)
    shutil.rmtree(shard_dir)


def load_memory_bank(bank_dir: str) -> datasets.Dataset:
    """A finished bank, or one line saying why it cannot be read (a truncated or foreign Arrow file)."""
    if not is_memory_bank(bank_dir):
        raise UserError(f"{bank_dir} is not a finished memory bank (no {CONFIG_NAME})")
    try:
        return datasets.load_from_disk(bank_dir)
    except Exception as e:  # pyarrow / datasets errors of a damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"memory bank {bank_dir} cannot be read: it is damaged or incomplete ({type(e).__name__}: "
                        f"{first}); generate it again into a new folder") from e


def bank_info(bank_dir: str) -> dict:
    with open(os.path.join(bank_dir, CONFIG_NAME)) as f:
        return json.load(f)


def build_memory_bank(accelerator, sampler, bank_dir, size, info: dict, batch_size: int = 32, seed: int = 0):
    """Generate the bank across all processes unless it exists, and return it. `info` (the family, base model and
    what else a run checks) is recorded in memory_bank.json with the sampler's settings, the batch size and seed."""
    if not is_memory_bank(bank_dir):
        generate_shards(sampler, bank_dir, size, batch_size=batch_size, seed=seed,
                        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                        show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finalize(bank_dir, size, {**info, **sampler.settings, "batch_size": batch_size, "seed": seed})
        accelerator.wait_for_everyone()
    return load_memory_bank(bank_dir)


def bank_record(bank_dir: str) -> dict:
    """What a finished bank was made with (memory_bank.json), completed from the data itself: its real row count,
    its latents' shape, and the family for banks of earlier versions, which did not record it."""
    bank = load_memory_bank(bank_dir)
    record = bank_info(bank_dir)
    columns = set(bank.column_names)
    derived_family = ("dit" if "class_label" in columns else "controlnet" if "conditioning_image" in columns
                      else "stable-diffusion")
    return {**record, "family": record.get("family", derived_family), "rows": len(bank),
            "latent_shape": list(bank.features["latent_moments"].shape)}


def check_memory_bank(bank_dir: str, expected: dict, min_rows: int = 1, size_if_generated: int | None = None,
                      flag: str = "--memory_bank") -> None:
    """The one check of a bank, before anything expensive: the folder is a finished bank whose record matches
    `expected` (family, base model, latent shape, prompt, annotator...; another one would teach the model someone
    else's samples) with at least `min_rows` rows, or a new folder where `size_if_generated` rows will be made."""
    check_bank_dir(bank_dir, flag)
    if not is_memory_bank(bank_dir):
        if size_if_generated is not None and size_if_generated < min_rows:
            raise UserError(f"--memory_bank_size {size_if_generated} is smaller than one batch of bank rows on every "
                            f"process ({min_rows})")
        return
    recorded = bank_record(bank_dir)
    for key, value in expected.items():
        value = list(value) if isinstance(value, tuple) else value
        if recorded.get(key) != value:
            raise UserError(f"memory bank {bank_dir} was made with {key} = {recorded.get(key)!r}, but this run has "
                            f"{value!r}; use a bank made for this run, or a new {flag} folder")
    if recorded["rows"] < min_rows:
        raise UserError(f"memory bank {bank_dir} has {recorded['rows']} rows, fewer than one batch of bank rows on "
                        f"every process ({min_rows})")


def memory_bank_card(info: dict) -> DatasetCard:
    """Dataset card of a memory bank: what generated it and how to use it."""
    data = DatasetCardData(tags=["diff-tuning", "memory-bank", "synthetic"], size_categories=None)
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in info.items())
    return DatasetCard(f"""---
{data.to_yaml()}
---

# Diff-Tuning memory bank of {info.get("base_model")}

Samples of the pre-trained pipeline `{info.get("base_model")}`, generated for Diff-Tuning
([Zhong et al., 2024](https://arxiv.org/abs/2406.00773)): each row holds the generated `image` with what generated
it (the `class_label` or the prompt `text`, and the `seed`), the control annotated from it for ControlNet banks
(`conditioning_image`), and the VAE posterior of the image (`latent_moments`, and of its mirror image for DiT
banks: mean and log-variance stacked on the channel axis, unscaled).

| generation setting | value |
|---|---|
{rows}

To reuse it: `datasets.load_dataset("<this repo>", split="train").save_to_disk("bank")`, download
`memory_bank.json` from this repo into `bank/`, then pass `--memory_bank bank` to the training script.
""")


def push_memory_bank(bank_dir: str, repo_id: str, token: str | None, private: bool = False) -> str:
    """Push a memory bank as a Hub dataset with its own card and generation settings. Returns the repo id."""
    token = hub.resolve_token(token)
    repo_id = hub.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private, token=token).repo_id
    datasets.load_from_disk(bank_dir).push_to_hub(repo_id, token=token, private=private)
    memory_bank_card(bank_info(bank_dir)).push_to_hub(repo_id, repo_type="dataset", token=token)
    hub.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=bank_dir, allow_patterns=[CONFIG_NAME],
                  token=token, commit_message="Add memory-bank generation settings")
    return repo_id
