"""FID at the benchmarks' small scale: feature networks trained inside the benchmark (small CNN classifiers whose
penultimate layer gives the features; FIDs on them compare within one benchmark's table only), and
`evaluate_fid.py` reports cached by path."""

import json
import os

import torch

import evaluate_fid


def train_and_save(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, path: str, steps: int = 1500) -> str:
    """Train `net` (its `forward` gives features, `net.head` the logits) on images `x` (float NCHW RGB in [0, 1])
    and labels `y` with Adam, batch 128, batches drawn from torch's global generator (the caller seeds it); save it
    as TorchScript at `path` (atomically) and return `path`."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.cross_entropy(net.head(net(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.jit.script(net.eval()).save(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def cached_fid(model, reference, extractor, samples, report, *extra, batch_size=100) -> list[float]:
    """The FIDs of `evaluate_fid.py` (one per handoff fraction) for `model` against the images of `reference`,
    sampled in batches of `batch_size` (with `--seed`, it fixes the samples); read from the JSON `report` when it
    exists, else computed and written there. The reference statistics are cached beside it (`fid_cache/`)."""
    if not os.path.exists(report):
        evaluate_fid.main(evaluate_fid.parse_args([
            "--model", model, "--dataset", reference, "--feature_extractor", extractor, "--num_samples", str(samples),
            "--batch_size", str(batch_size), "--reference_cache_dir",
            os.path.join(os.path.dirname(report), "fid_cache"), "--output_file", report, *extra]))
    with open(report) as f:
        return [r["fid"] for r in json.load(f)["results"]]
