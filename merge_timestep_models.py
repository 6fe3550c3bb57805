#!/usr/bin/env python
"""Merge timestep-range copies of a model (DeMe) into one model, search the merge weights, or export an ensemble.

    python merge_timestep_models.py --base_model <pretrained> --models out/range_0 ... out/range_3 \\
        --weights 0.1 0.1 0.2 0.5 --output_dir merged

theta_merged = theta + sum_i w_i (theta_i - theta) (`--merge_method task_arithmetic`; TIES and DARE through peft),
computed tensor by tensor from safetensors. `--search grid|coordinate` scores candidate weights by the merged
model's held-out denoising loss per timestep range, or its FID, and keeps the best; `--ensemble` saves the N models as a
timestep-wise ensemble instead (model i on range i: the paper's "before merge"). `--models out` (a train_deme.py
output folder) means all its ranges in order.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import itertools
import json
import math
import os
import shutil
import sys

import datasets
import diffusers
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import save_file

from utils.families.ddpm import denoiser_weights_folder
from utils.families.registry import DEME, detect_family
from utils.infra import hub
from utils.infra.data import load_image_dataset, require_column
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.outputs import check_finite_model, check_output_dir, finite_tensors, replace_dir, work_dir
from utils.infra.training import HelpFormatter
from utils.methods.channel_projection import PROJECTION_FILE, attach_saved_projections, load_official_projections
from utils.methods.deme import expand_models, model_ranges, range_losses
from utils.methods.merging import (
    MERGE_METHODS,
    WEIGHTS_NAME,
    IdentityMaps,
    SafetensorsWeights,
    check_compatible,
    iter_merged,
    merge_tensors,
    save_merged,
)
from utils.methods.timestep_ensemble import TimestepEnsemble
from utils.metrics.fid import load_feature_extractor, make_metric, reference_statistics
from utils.metrics.sampling import generate

SCRIPT = "merge_timestep_models.py"  # marks the output folders it writes (utils.infra.outputs): only those are replaced


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--base_model", required=True,
                   help="The pre-trained model theta: pipeline or model folder, or Hub id.")
    p.add_argument("--models", nargs="+", required=True,
                   help="Fine-tuned model folders theta_i in range order, or one train_deme.py output folder.")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="w_i, one per model (default without --search: 1/N each).")
    p.add_argument("--merge_method", choices=MERGE_METHODS, default="task_arithmetic",
                   help="How the task vectors theta_i - theta combine (peft's merge utilities).")
    p.add_argument("--density", type=float, default=0.5, help="TIES/DARE: fraction of each task vector kept.")
    p.add_argument("--output_dir", required=True, help="Where the merged model (or ensemble) goes.")
    p.add_argument("--ensemble", action="store_true", help="Save a timestep-wise ensemble instead of merging.")
    p.add_argument("--seed", type=int, default=0, help="Seed of DARE's pruning and of the search's noise.")

    g = p.add_argument_group("merge-weight search")
    g.add_argument("--search", choices=["none", "grid", "coordinate"], default="none",
                   help="grid: every combination of --grid_values; coordinate: from --weights (or 1/N), improve "
                        "one weight at a time over --grid_values, --search_rounds times.")
    g.add_argument("--search_metric", choices=["loss", "fid"], default="loss",
                   help="loss: held-out denoising loss of the merged model, averaged over the timestep ranges "
                        "(cheap). fid: FID of --fid_samples DDIM samples against the validation images (DDPM "
                        "pipelines; see evaluate_fid.py for the feature extractors).")
    g.add_argument("--grid_values", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="Candidate weight values.")
    g.add_argument("--search_rounds", type=int, default=2, help="Coordinate search: passes over the weights.")
    g.add_argument("--validation_dataset", default=None, help="Held-out images (same forms as --dataset elsewhere).")
    g.add_argument("--validation_split", default="train", help="Split of the validation dataset.")
    g.add_argument("--image_column", default=None, help="Image column of the validation dataset.")
    g.add_argument("--caption_column", default=None, help="Caption column (text-to-image pipelines).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3 and Flux: T5 tokens per caption of the search's held-out rows (default: 77 for SD3, 512 "
                        "for Flux).")
    g.add_argument("--validation_batches", type=int, default=4, help="Batches scored per range and candidate.")
    g.add_argument("--validation_batch_size", type=int, default=32, help="Images per validation batch.")
    g.add_argument("--feature_extractor", default="inception",
                   help="fid: inception[:weights file], fid-helper, a TorchScript file or module:callable.")
    g.add_argument("--fid_samples", type=int, default=1000, help="fid: samples per candidate (same seeds for all).")
    g.add_argument("--fid_inference_steps", type=int, default=50, help="fid: DDIM steps per sample.")
    g.add_argument("--reference_cache_dir", default=os.path.join("~", ".cache", "diffusion-transfer", "fid"),
                   help="fid: where the validation images' statistics are cached ('': no cache).")

    g = p.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true", help="Upload the output folder.")
    g.add_argument("--hub_model_id", default=None, help="Repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    args.models = expand_models(args.models)
    check_args(args)
    return args


def check_args(args):
    n = len(args.models)
    if args.weights is not None and len(args.weights) != n:
        raise UserError(f"--weights has {len(args.weights)} values for {n} models; give one weight per model")
    for path in args.models:
        if not os.path.isdir(path):
            raise UserError(f"model folder {path} does not exist")
    if not 0 < args.density <= 1:
        raise UserError(f"--density must be in (0, 1], got {args.density}")
    if args.search != "none" and args.validation_dataset is None:
        raise UserError("--search needs --validation_dataset (held-out images to score the merged model on)")
    if args.search != "none" and args.ensemble:
        raise UserError("--search chooses merge weights; it has no use with --ensemble")
    if args.search_metric == "fid" and args.fid_samples < 2:
        raise UserError(f"--fid_samples must be >= 2, got {args.fid_samples}")
    if args.search == "grid" and len(args.grid_values) ** n > 10_000:
        raise UserError(f"--search grid would try {len(args.grid_values)}^{n} combinations; use coordinate")
    # The output folder is replaced at the end: it may only be new, empty, or an earlier output of this script,
    # and never one of the inputs or a folder holding them.
    check_output_dir(args.output_dir, SCRIPT, [("--base_model", args.base_model),
                                               *(("--models", m) for m in args.models),
                                               ("--validation_dataset", args.validation_dataset)])


def local_folder(name):
    """A local folder for a folder path or a Hub id (downloaded, or from the cache when offline)."""
    if os.path.isdir(name):
        return name
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "README.md"])
    except Exception as e:
        raise UserError(f"--base_model {name!r} is no local folder and could not be fetched from the Hub "
                        f"({type(e).__name__})") from e


def main(args):
    if args.push_to_hub:
        hub.check_hub_access(args.hub_token)
    base_dir = local_folder(args.base_model)
    is_pipeline = os.path.exists(os.path.join(base_dir, "model_index.json"))
    base = SafetensorsWeights(denoiser_weights_folder(base_dir))
    models = [SafetensorsWeights(denoiser_weights_folder(m)) for m in args.models]
    check_compatible(base, models, args.models)
    configs = [json.load(open(os.path.join(denoiser_weights_folder(m), "config.json"))) for m in args.models]
    model_class = configs[0]["_class_name"]
    if args.ensemble and "Transformer" in model_class:
        raise UserError(f"--ensemble routes each timestep to its range's model; {model_class}'s pipelines give the "
                        "transformer sigma, not a range's timestep index: merge them instead (leave --ensemble out)")
    projected = [os.path.exists(os.path.join(m, PROJECTION_FILE)) for m in args.models]
    if any(projected) and not all(projected):
        raise UserError("some models carry official-placement channel projections and some do not")

    pipeline = family = batches = None
    fid = args.search != "none" and args.search_metric == "fid"
    metric = None  # FID: the extractor is loaded before any work, so a missing one fails at once
    extractor = load_feature_extractor(args.feature_extractor) if fid else None
    if args.search != "none":
        if not is_pipeline:
            raise UserError("--search needs the base to be a pipeline (its scheduler, and VAE/text encoder for SD)")
        family = detect_family(base_dir, DEME, "the merge-weight search")
        if fid and family.needs_captions:
            raise UserError("--search_metric fid scores DDPM pipelines; for Stable Diffusion use loss (text-to-image "
                            "FID needs a prompt set)")
        pipeline = family.load(base_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # no flips: every candidate sees the same held-out images
        family = family.from_pipeline(pipeline, device, **family.options(args))
        if fid:
            metric = fid_reference(args, extractor, family)
        else:
            batches = validation_batches(args, family)
    num_timesteps = json.load(open(os.path.join(base_dir, "scheduler", "scheduler_config.json")))[
        "num_train_timesteps"] if is_pipeline else 1000
    ranges = model_ranges(args.models, num_timesteps)

    # Built in a marked temporary folder and renamed when complete: a crash never leaves a finished-looking folder.
    tmp = work_dir(args.output_dir, SCRIPT)
    # A merged UNet goes into a copy of the base pipeline; an ensemble is no stock UNet, so it stands alone.
    as_pipeline = is_pipeline and not args.ensemble
    key = os.path.basename(denoiser_weights_folder(base_dir)) if is_pipeline else None  # unet, or transformer
    if as_pipeline:
        shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns(key, "README.md", ".cache"), dirs_exist_ok=True)
    unet_dir = os.path.join(tmp, key) if as_pipeline else tmp
    os.makedirs(unet_dir, exist_ok=True)

    maps = [SafetensorsWeights(os.path.join(m, PROJECTION_FILE)) for m in args.models] if all(projected) else None
    table = []
    if args.ensemble:
        # each model with its official-placement channel projections, if it has them (saved beside it again)
        ensemble = TimestepEnsemble([attach_saved_projections(getattr(diffusers, model_class).from_pretrained(
            denoiser_weights_folder(m)), m) for m in args.models], ranges)
        ensemble.save_pretrained(unet_dir)
        weights = None
    else:
        weights = args.weights or [1.0 / len(models)] * len(models)
        if args.search != "none":
            weights, table = search_weights(args, base, models, maps, pipeline, family, batches, metric,
                                            ranges, weights)
        try:  # tensor by tensor, each checked as it is written: never the whole model in memory
            save_merged(os.path.join(unet_dir, WEIGHTS_NAME), base.meta, finite_tensors(
                iter_merged(base, models, weights, args.merge_method, args.density, args.seed), "the merged model"))
        except UserError:
            shutil.rmtree(tmp)
            raise
        if maps:
            save_file(merge_tensors(IdentityMaps(maps[0]), maps, weights, args.merge_method, args.density, args.seed),
                      os.path.join(unet_dir, PROJECTION_FILE))
        with open(os.path.join(unet_dir, "config.json"), "w") as f:
            json.dump(configs[0], f, indent=2)
    try:  # the merged UNet was checked while it streamed; the ensemble and merged projection maps are read back
        if args.ensemble:
            check_finite_model(unet_dir, "the ensemble")
        elif os.path.exists(os.path.join(unet_dir, PROJECTION_FILE)):
            check_finite_model(unet_dir, "the merged channel projections", [os.path.join(unet_dir, PROJECTION_FILE)])
    except UserError:
        shutil.rmtree(tmp)
        raise
    if table:
        with open(os.path.join(tmp, "search_results.json"), "w") as f:
            json.dump(table, f, indent=2, allow_nan=False)
    write_card(args, tmp, model_class, as_pipeline, ranges, weights, table)
    replace_dir(tmp, args.output_dir, SCRIPT)
    print(f"saved {'ensemble' if args.ensemble else 'merged model'} to {args.output_dir}")
    if args.push_to_hub:
        repo = hub.hub_repo_id(args.hub_model_id, args.output_dir, args.push_to_hub, args.hub_token)
        repo = hub.push_folder(args.output_dir, repo, args.hub_token, args.hub_private_repo)
        print(f"pushed to https://huggingface.co/{repo}")
    return weights, table


def validation_batches(args, family):
    """The held-out batches every candidate is scored on (fixed order, no flips)."""
    ds = load_image_dataset(args.validation_dataset, args.validation_split)
    image_column = require_column(ds, args.image_column, datasets.Image, "image", "--image_column",
                                  "validation dataset")
    caption_column = None
    if family.needs_captions:
        caption_column = args.caption_column or next((c for c in ("text", "caption") if c in ds.column_names), None)
        if caption_column not in ds.column_names:
            raise UserError(f"validation dataset has no caption column (columns: {', '.join(ds.column_names)})")
    n = min(len(ds), args.validation_batches * args.validation_batch_size)
    rows = ds.select(range(n)).with_transform(family.transform(image_column, caption_column, family.resolution))
    return list(torch.utils.data.DataLoader(rows, batch_size=args.validation_batch_size, collate_fn=family.collate))


def fid_reference(args, extractor, family):
    """The FID metric holding the validation images' statistics (cached like evaluate_fid.py's)."""
    ds = load_image_dataset(args.validation_dataset, args.validation_split)
    image_column = require_column(ds, args.image_column, datasets.Image, "image", "--image_column",
                                  "validation dataset")
    metric = make_metric(extractor).to(family.device)
    cache = os.path.expanduser(args.reference_cache_dir) if args.reference_cache_dir else None
    reference_statistics(metric, ds, image_column, family.resolution, args.feature_extractor, cache)
    return metric


def search_weights(args, base, models, maps, pipeline, family, batches, metric, ranges, start):
    """Score candidate weights by held-out loss per range (same noise for every candidate) or by FID (same seeds);
    returns the best weights and the table of every candidate tried, best first. `maps`: the models' official-
    placement channel projections (or None); each candidate is scored with its merged maps attached, as it is saved."""
    unet = getattr(pipeline, family.model_key).to(family.device).eval()  # UNet, or transformer (SD3, Flux)
    scored = {}

    def score(weights):
        key = tuple(round(w, 6) for w in weights)
        if key not in scored:
            merged = merge_tensors(base, models, list(key), args.merge_method, args.density, args.seed)
            if maps:
                load_official_projections(unet, merge_tensors(IdentityMaps(maps[0]), maps, list(key),
                                                              args.merge_method, args.density, args.seed))
            missing, unexpected = unet.load_state_dict(merged, strict=False)
            if unexpected or any("channel_projection" not in k for k in missing):
                raise RuntimeError(f"merged weights do not fit the base UNet: {unexpected or missing}")
            if metric is None:
                losses = range_losses(family, unet, batches, ranges, args.seed)
                row = {"range_losses": losses, "mean_loss": sum(losses) / len(losses)}
                row["score"] = row["mean_loss"]
                detail = f"mean held-out loss {row['mean_loss']:.5f}  per range " + " ".join(f"{x:.5f}" for x in losses)
            else:
                metric.reset()
                for images in generate(family.sampling_pipeline(unet), args.fid_samples, args.validation_batch_size,
                                       args.fid_inference_steps, args.seed, family.device,
                                       desc=f"FID of {list(key)}"):
                    metric.update(images.to(family.device), real=False)
                row = {"fid": float(metric.compute())}
                row["score"] = row["fid"]
                detail = f"FID {row['fid']:.3f}"
            if not math.isfinite(row["score"]):  # a diverging candidate: recorded, never chosen
                row, detail = {"score": None, "non_finite": True}, "not finite"
            scored[key] = {"weights": list(key), **row}
            print(f"weights {list(key)}: {detail}", flush=True)
        return math.inf if scored[key]["score"] is None else scored[key]["score"]

    if args.search == "grid":
        best = min(itertools.product(args.grid_values, repeat=len(models)), key=score)
    else:
        best = list(start)
        for _ in range(args.search_rounds):
            for i in range(len(models)):
                best[i] = min(args.grid_values + [best[i]], key=lambda v: score(best[:i] + [v] + best[i + 1:]))
    table = sorted(scored.values(), key=lambda row: math.inf if row["score"] is None else row["score"])
    if table[0]["score"] is None:
        raise UserError("every merge candidate scored NaN or infinity: the models to merge are broken")
    return list(table[0]["weights"]), table


def write_card(args, out, model_class, is_pipeline, ranges, weights, table):
    n = len(args.models)
    hyper = {"base_model": args.base_model, "models": " ".join(args.models),
             "timestep_ranges": " ".join(f"[{lo},{hi})" for lo, hi in ranges)}
    if args.ensemble:
        title = f"DeMe timestep-wise ensemble of {n} models of {args.base_model}"
        description = (f"{n} models fine-tuned from `{args.base_model}` on timestep ranges with DeMe "
                       "([Ma et al.](https://arxiv.org/abs/2410.06664)), kept apart: model i denoises the timesteps "
                       "of range i (the paper's \"before merge\", N times the weights of one model).")
        usage = f'''from diffusers import DDIMPipeline, DDIMScheduler
from utils.methods.timestep_ensemble import TimestepEnsemble  # from this project (diff-tuning examples)
pipe = DDIMPipeline(unet=TimestepEnsemble.from_pretrained("<this folder>"),
                    scheduler=DDIMScheduler.from_pretrained("{args.base_model}", subfolder="scheduler"))
image = pipe(num_inference_steps=50).images[0]'''
    else:
        hyper.update({"merge_method": args.merge_method, "weights": " ".join(f"{w:g}" for w in weights)})
        if args.merge_method != "task_arithmetic":
            hyper["density"] = args.density
        if args.search != "none":
            hyper.update({"search": args.search, "search_metric": args.search_metric,
                          "grid_values": " ".join(f"{v:g}" for v in args.grid_values),
                          "validation_dataset": args.validation_dataset, "candidates_tried": len(table)})
        title = f"DeMe merge of {n} timestep-range models of {args.base_model}"
        description = (f"{n} copies of `{args.base_model}`, each fine-tuned on one timestep range with DeMe "
                       "([Ma et al.](https://arxiv.org/abs/2410.06664)), merged in parameter space: "
                       "theta + sum_i w_i (theta_i - theta). One stock model, no extra inference cost.")
        if is_pipeline:
            repo = args.hub_model_id or "<this repo>"
            usage = f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{repo}")'
        else:
            usage = f'from diffusers import {model_class}\nunet = {model_class}.from_pretrained("<this repo>")'
    metrics = {}
    for row in table[:20]:
        if row["score"] is None:
            metrics[f"weights {row['weights']}"] = "not finite"
        elif "fid" in row:
            metrics[f"FID, weights {row['weights']}"] = f"{row['fid']:.3f}"
        else:
            metrics[f"held-out loss, weights {row['weights']}"] = (
                f"{row['mean_loss']:.5f} (per range: {', '.join(f'{x:.4f}' for x in row['range_losses'])})")
    hub.save_model_card(out, title=title, base_model=args.base_model,
                        tags=["deme", "merge", "timestep-ensemble" if args.ensemble else args.merge_method],
                        description=description, hyperparameters=hyper, metrics=metrics, usage=usage)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
