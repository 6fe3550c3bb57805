"""Shared pieces of the training scripts, in floors that import only downwards: `methods` (the papers' methods, each
one object a script hands a model family to) and `families` (one adapter per kind of model: how it is detected, fed,
predicts, samples and makes memory-bank rows) side by side, neither importing the other; under both, `diffusion`
(forward processes, timestep weights, losses, the batch composer, latents); then `metrics` (FID, control fidelity
and its annotators, evaluation sampling) and `infra` (training conventions, checkpoints, data, outputs, Hub). The
map of every module: docs/layout.md."""
