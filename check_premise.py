#!/usr/bin/env python
"""Check Diff-Tuning's premise on your data before spending a training budget.

Diff-Tuning rests on the "chain of forgetting": a pre-trained diffusion model keeps what transfers near the data
(small t: it denoises new images about as well as its own samples, so the last steps of sampling can be left to
it) and loses it far from the data (large t, where a new domain is shaped). Retention at small t (the memory bank)
is worth its cost only where that holds. Two measures, on a small sample of your images:

1. Denoising error per timestep bucket: the pre-trained model's epsilon error (null class / empty prompt, the
   condition memory-bank rows train on) on your images and on its own samples, with the same timesteps and noise
   for both; the ratio yours / its own, per bucket.
2. Hand-off cost: your images (set A) noised to where the last k% of a DDIM schedule begins and finished by the
   pre-trained model over those k% of the steps, as a perfectly fine-tuned model would hand them over; the FID of
   the result against other images of yours (set B), relative to the FID of A itself against B (the sample's own
   floor). The paper's chain-of-forgetting measure (hand the last k% of sampling to the pre-trained model) with
   your data standing in for the fine-tuned model that does not exist yet. The same is measured where the model is
   at home, its own floor: on two sets of its own samples, or, better, on two sets of real images of its training
   domain (`--source_dataset`): a small model pays on real images even of its own domain (docs/evaluation.md).

    python check_premise.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 --dataset <your images> \\
        --feature_extractor fid-helper --output_dir premise [--num_images 64] [--handoff_fractions 0.1 0.2]

It prints a table and a verdict and writes `premise.json` and `premise.png`. Verdict rule: the premise holds when
the small-t bucket's error ratio is at most `--small_t_ratio` (1.25) AND handing the smallest fraction over costs on
your images at most `--max_handoff_cost` (0.05: 5 points of relative FID) more than at home; otherwise
it does not, and the message says which part failed. With a small sample FID is biased upwards; the FIDs of a cost
share the bias, so read the relative costs, not the values.
DiT, Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines (prompted families: their own samples of `--prompt`,
the empty prompt as the null condition; SD3 and Flux: noise-level buckets over their discrete sigmas, the velocity's
error, and the hand-off over their own flow-matching Euler schedule).
"""

import utils.infra.quiet  # noqa: F401  (first: leaves out notes our pinned stack causes on purpose)

# isort: split
import argparse
import os
import sys

import datasets
import numpy as np
import torch

from utils.diffusion.forward_process import forward_process
from utils.diffusion.losses import compose_batch
from utils.families.base import BankSettings
from utils.families.registry import PREMISE, detect_family
from utils.infra.data import check_images, load_image_dataset, require_column, to_tensor
from utils.infra.errors import UserError
from utils.infra.flags import check_finite_flags, parse_flags
from utils.infra.outputs import check_output_dir, mark, write_json_atomically
from utils.infra.training import HelpFormatter
from utils.metrics.fid import load_feature_extractor, make_metric

SCRIPT = "check_premise.py"
BUCKETS = [(0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.0)]  # fractions of the training timesteps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="DiTPipeline or Stable Diffusion 1.x/2.x pipeline: Hub id or folder.")
    p.add_argument("--revision", default=None, help="Revision of the pipeline on the Hub.")
    p.add_argument("--dataset", required=True,
                   help="Your images: Hub id, image folder, parquet / json-lines / csv folder, or save_to_disk folder.")
    p.add_argument("--dataset_config_name", default=None, help="Config of a Hub dataset.")
    p.add_argument("--split", default="train", help="Split of the dataset.")
    p.add_argument("--image_column", default=None, help="Image column (default: the only Image column, or 'image').")
    p.add_argument("--source_dataset", default=None,
                   help="Real images of the model's own training domain (e.g. ImageNet validation images for DiT-XL): "
                        "the hand-off cost at home is measured on them instead of on the model's own samples.")
    p.add_argument("--cache_dir", default=None, help="Where downloaded datasets and models are cached.")
    p.add_argument("--output_dir", default="premise", help="Where premise.json and premise.png go.")
    p.add_argument("--num_images", type=int, default=64,
                   help="Images per set: A (measured) and B (the FID reference) take this many of yours each "
                        "(half of the data each when it has fewer), and the model draws as many samples.")
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's).")
    p.add_argument("--prompt", default="a high-quality, detailed, and professional image",
                   help="Stable Diffusion: the prompt of the model's own samples.")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="CFG of the model's own samples (default: 1.5 for DiT, 7.5 for Stable Diffusion).")
    p.add_argument("--num_inference_steps", type=int, default=50,
                   help="DDIM steps of the model's samples and of the schedule the hand-off is a part of.")
    p.add_argument("--handoff_fractions", type=float, nargs="+", default=[0.1, 0.2],
                   help="Fractions k of the DDIM steps handed to the pre-trained model (each in (0, 1]).")
    p.add_argument("--feature_extractor", default="fid-helper",
                   help="FID features: inception[:weights], fid-helper, a TorchScript file or module:callable "
                        "(as evaluate_fid.py).")
    p.add_argument("--small_t_ratio", type=float, default=1.25,
                   help="The premise holds only if your images' small-t error is at most this times its samples'.")
    p.add_argument("--max_handoff_cost", type=float, default=0.05,
                   help="... and handing the smallest fraction over costs at most this much more relative FID on "
                        "your images than at home (its own samples, or --source_dataset).")
    p.add_argument("--batch_size", type=int, default=16, help="Images per model call.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the sample choice, samples, timesteps and noise.")
    args = parse_flags(p, argv)
    check_finite_flags(args)  # nan and inf pass every range check below
    for name in ("num_images", "num_inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for k in args.handoff_fractions:
        if not 0 < k <= 1:
            raise UserError(f"--handoff_fractions must lie in (0, 1], got {k:g}")
    if args.small_t_ratio <= 0 or args.max_handoff_cost < 0:
        raise UserError("--small_t_ratio must be > 0 and --max_handoff_cost >= 0")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    check_output_dir(args.output_dir, SCRIPT, [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                                               ("--dataset", args.dataset), ("--source_dataset", args.source_dataset)])
    return args


def batches(n, size):
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def denoising_errors(family, net, latents, cond, seed, batch_size):
    """Epsilon MSE (or the family's target: the velocity under flow matching) of `net` on `latents` per noise-level
    bucket under `cond`; the timesteps and noise depend on `seed`, the bucket and the row alone, so two sets of
    latents of the same size see the same problems."""
    process = forward_process(family.scheduler)
    T = process.num_timesteps
    errors = []
    for b, (lo, hi) in enumerate(BUCKETS):
        g = torch.Generator().manual_seed(seed * 1000 + b)
        t = torch.randint(int(lo * T), max(int(lo * T) + 1, int(hi * T)), (len(latents),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        index = process.index_from_data_side(t)  # the bucket counts from the data (DDPM's t; flow's smallest sigma)
        total = 0.0
        for idx in batches(len(latents), batch_size):
            batch = compose_batch(process, family, latents[idx], {k: v[idx] for k, v in cond.items()}, index[idx],
                                  noise=noise[idx])
            pred = family.predict(net, batch.noisy, batch.timesteps, batch.cond)[:, : batch.x0.shape[1]]
            total += float((pred.float() - batch.target.float()).pow(2).mean(dim=(1, 2, 3)).sum())
        errors.append(total / len(latents))
    return errors


@torch.no_grad()
def hand_off(family, net, latents, cond, fraction, num_steps, seed, batch_size):
    """`latents` noised to where the last `fraction` of the family's `num_steps`-step schedule begins (DDIM; SD3
    and Flux: their flow-matching Euler schedule), then denoised by `net` over those steps (eta 0, no guidance):
    the latents it hands back."""
    scheduler = family.handoff_scheduler(num_steps, latents.shape)
    steps = scheduler.timesteps[-max(1, round(fraction * num_steps)):]
    g = torch.Generator().manual_seed(seed * 1000 + 999)
    x = family.noised_to(scheduler, latents, torch.randn(latents.shape, generator=g), steps[0])
    out = []
    for idx in batches(len(latents), batch_size):
        scheduler = family.handoff_scheduler(num_steps, latents.shape)  # a fresh one: the Euler sampler counts steps
        xb, cb = x[idx], family.encode({k: v[idx] for k, v in cond.items()})
        for t in steps:
            pred = family.predict(net, xb, t.expand(len(xb)), cb)[:, : xb.shape[1]]
            xb = scheduler.step(pred, t, xb).prev_sample
        out.append(xb)
    return torch.cat(out)


@torch.no_grad()
def decode(family, latents, batch_size):
    """Latents (the model's x_0) -> float NCHW images in [0, 1]."""
    return torch.cat([family.decode_latents(latents[idx]) for idx in batches(len(latents), batch_size)])


def fid(metric, images, batch_size):
    metric.reset()  # keeps the reference (set B)
    for idx in batches(len(images), batch_size):
        metric.update(images[idx], real=False)
    return float(metric.compute())


def verdict(ratios, costs, own_costs, args):
    """(holds, one-paragraph verdict) from the docstring's rule. `costs`, `own_costs`: {k: relative FID cost} on
    your images and at home (its own samples, or --source_dataset)."""
    home = "its own domain's images" if getattr(args, "source_dataset", None) else "its own samples"
    small = ratios[0]
    k = min(costs)
    cost, own = costs[k], own_costs[k]
    parts = []
    if small > args.small_t_ratio:
        parts.append(f"at small t it denoises your images x{small:.2f} worse than its own samples (limit "
                     f"x{args.small_t_ratio:g})")
    if cost - own > args.max_handoff_cost:
        parts.append(f"finishing the last {100 * k:g}% of sampling from your images costs FID {100 * cost:+.0f}%, "
                     f"against {100 * own:+.0f}% on {home} (limit: {100 * args.max_handoff_cost:g} points more)")
    if not parts:
        return True, (f"the chain-of-forgetting premise holds on this data: at small t the pre-trained model denoises "
                      f"your images about as well as its own samples (x{small:.2f}; x{ratios[-1]:.2f} at large t), "
                      f"and finishing the last {100 * k:g}% of sampling from your images costs FID "
                      f"{100 * cost:+.1f}%, against {100 * own:+.1f}% on {home}. Expect retention "
                      "(memory-bank rows at small t) to keep knowledge that transfers: Diff-Tuning can help where "
                      "standard fine-tuning forgets it.")
    return False, ("the chain-of-forgetting premise does not hold on this data: " + "; and ".join(parts) + ". Expect "
                   "little from retention: its small-t knowledge does not fit your images. Prefer standard fine-tuning "
                   "(--method standard), or a small --retention_weight (the official code's 0.1).")


def main(args):
    torch.manual_seed(args.seed)
    family_class = detect_family(args.pretrained_model_name_or_path, PREMISE, SCRIPT,
                                 args.revision, args.cache_dir)
    resolution = family_class.check_resolution(args.pretrained_model_name_or_path, args.resolution, args.revision,
                                               args.cache_dir)  # the model's own unless given
    ds = load_image_dataset(args.dataset, args.split, args.dataset_config_name, args.cache_dir)
    image_column = require_column(ds, args.image_column, datasets.Image, "image", "--image_column")
    if len(ds) < 4:
        raise UserError(f"dataset {args.dataset} has {len(ds)} image(s); the check needs at least 4 (two sets)")
    n = min(args.num_images, len(ds) // 2)
    ds = ds.shuffle(seed=args.seed).select(range(2 * n))
    check_images(ds, image_column)
    home = None
    if args.source_dataset:
        home = load_image_dataset(args.source_dataset, args.split, None, args.cache_dir)
        home_column = require_column(home, args.image_column, datasets.Image, "image", "--image_column",
                                     "--source_dataset")
        if len(home) < 2 * n:
            raise UserError(f"--source_dataset has {len(home)} image(s); the check needs {2 * n} (two sets of "
                            f"{n}, as many as of yours)")
        home = home.shuffle(seed=args.seed).select(range(2 * n))
        check_images(home, home_column)
    extractor = load_feature_extractor(args.feature_extractor)  # before any weights load
    mark(args.output_dir, SCRIPT)

    pipeline = family_class.load(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    pipeline.set_progress_bar_config(disable=True)
    seeds = list(range(args.seed, args.seed + 2 * n))  # two sets of its own samples
    family = family_class.from_pipeline(pipeline, "cpu")
    net = family.denoiser.eval()
    # its own samples, drawn as a memory bank of the family would be (DiT: random classes; else --prompt)
    sampler = family_class.bank_plan(args.pretrained_model_name_or_path, BankSettings(
        args.guidance_scale, args.num_inference_steps, resolution, [args.prompt], revision=args.revision,
        cache_dir=args.cache_dir), {}).sampler(pipeline)
    null = family.null_condition(n, resolution)  # the condition memory-bank rows train on, encoded per batch
    with torch.no_grad():
        drawn = [sampler([seeds[i] for i in idx]) for idx in batches(2 * n, args.batch_size)]
        own_all = family.mean_latents(torch.cat([torch.from_numpy(np.asarray(d["latent_moments"])) for d in drawn]))
        own = own_all[:n]
        own_images = torch.cat([torch.from_numpy(np.stack([np.asarray(i) for i in d["image"]])) for d in drawn])
        own_reference = own_images[n:].permute(0, 3, 1, 2).float() / 255
        if home is not None:  # real images of its domain: set A' encoded, set B' the reference
            home_pixels = torch.stack([to_tensor(img, resolution) for img in home[home_column]])
            home_a = torch.cat([family.mean_latents(family.encode_pixels(home_pixels[idx]))
                                for idx in batches(n, args.batch_size)])
            home_reference = home_pixels[n:] / 2 + 0.5
        pixels = torch.stack([to_tensor(img, resolution) for img in ds[image_column]])
        set_a = torch.cat([family.mean_latents(family.encode_pixels(pixels[idx]))
                           for idx in batches(n, args.batch_size)])
    own_errors = denoising_errors(family, net, own, null, args.seed, args.batch_size)
    your_errors = denoising_errors(family, net, set_a, null, args.seed, args.batch_size)
    ratios = [y / o for y, o in zip(your_errors, own_errors)]

    metric = make_metric(extractor)
    reference = pixels[n:] / 2 + 0.5
    for idx in batches(n, args.batch_size):
        metric.update(reference[idx], real=True)
    floor = fid(metric, decode(family, set_a, args.batch_size), args.batch_size)  # A through the VAE, against B
    handoff = {k: fid(metric, decode(family, hand_off(family, net, set_a, null, k, args.num_inference_steps, args.seed,
                                                   args.batch_size), args.batch_size), args.batch_size)
               for k in sorted(args.handoff_fractions)}
    costs = {k: v / floor - 1 for k, v in handoff.items()}
    # the same at home (its own samples, or --source_dataset): set A' handed over, against set B'
    at_home, home_ref = (own, own_reference) if home is None else (home_a, home_reference)
    own_metric = make_metric(extractor)
    for idx in batches(n, args.batch_size):
        own_metric.update(home_ref[idx], real=True)
    own_floor = fid(own_metric, decode(family, at_home, args.batch_size), args.batch_size)
    own_handoff = {k: fid(own_metric, decode(family, hand_off(family, net, at_home, null, k, args.num_inference_steps,
                                                           args.seed, args.batch_size), args.batch_size),
                          args.batch_size) for k in sorted(args.handoff_fractions)}
    own_costs = {k: v / own_floor - 1 for k, v in own_handoff.items()}
    holds, text = verdict(ratios, costs, own_costs, args)
    T = forward_process(family.scheduler).num_timesteps
    report = {"model": args.pretrained_model_name_or_path, "family": family_class.name, "dataset": args.dataset,
              "images_per_set": n, "feature_extractor": extractor.name,
              "buckets": [[int(lo * T), int(hi * T)] for lo, hi in BUCKETS],
              "error_on_your_images": your_errors, "error_on_its_own_samples": own_errors, "error_ratio": ratios,
              "fid_your_images": floor, "fid_after_handoff": {f"{k:g}": v for k, v in handoff.items()},
              "handoff_cost": {f"{k:g}": v for k, v in costs.items()},
              "home": args.source_dataset or "its own samples", "fid_its_own_samples": own_floor,
              "fid_after_handoff_own": {f"{k:g}": v for k, v in own_handoff.items()},
              "handoff_cost_own": {f"{k:g}": v for k, v in own_costs.items()},
              "rule": {"small_t_ratio": args.small_t_ratio, "max_handoff_cost": args.max_handoff_cost},
              "premise_holds": holds, "verdict": text}
    write_json_atomically(os.path.join(args.output_dir, "premise.json"), report)
    plot(report, os.path.join(args.output_dir, "premise.png"))
    print(f"{'t bucket':14s} {'your images':>12s} {'its samples':>12s} {'ratio':>7s}")
    for (lo, hi), y, o, r in zip(report["buckets"], your_errors, own_errors, ratios):
        print(f"[{lo:4d}, {hi:4d})   {y:12.4f} {o:12.4f} {r:7.2f}")
    print(f"FID of your images (set A vs B, through the VAE): {floor:.3f}")
    where = "its own domain's images" if home is not None else "its own samples"
    print(f"FID of {where} (two sets, through the VAE): {own_floor:.3f}")
    for k, v in handoff.items():
        print(f"last {100 * k:g}% handed to the pre-trained model: FID {v:.3f} ({100 * costs[k]:+.1f}%); on {where} "
              f"{own_handoff[k]:.3f} ({100 * own_costs[k]:+.1f}%)")
    print(text)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [f"[{lo}, {hi})" for lo, hi in report["buckets"]]
    left.plot(labels, report["error_on_your_images"], marker="o", label="your images")
    left.plot(labels, report["error_on_its_own_samples"], marker="o", label="its own samples")
    left.set_xlabel("timestep bucket")
    left.set_ylabel("denoising error (null condition)")
    left.legend(fontsize=8)
    ks = [0.0] + [float(k) for k in report["fid_after_handoff"]]
    right.plot([100 * k for k in ks], [0.0, *report["handoff_cost"].values()], marker="o", label="your images")
    right.plot([100 * k for k in ks], [0.0, *report["handoff_cost_own"].values()], marker="o", label=report["home"])
    right.set_xlabel("last % of DDIM steps handed to the pre-trained model")
    right.set_ylabel("relative FID cost")
    right.legend(fontsize=8)
    fig.suptitle("premise " + ("holds" if report["premise_holds"] else "does not hold"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
