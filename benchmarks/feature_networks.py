"""The benchmarks' FID feature networks: small CNN classifiers whose penultimate layer gives the features (FIDs on
them compare within one benchmark's table only)."""

import os

import torch


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
