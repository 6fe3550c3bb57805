"""Shared pieces of the training scripts, in four floors: `methods` (the papers' methods, each a small object a
script hands a model family to), `families` (how each kind of model is fed, predicts and samples), `metrics` (FID,
control fidelity, evaluation sampling) and `infra` (training conventions, checkpoints, data, outputs, Hub). The map
of every module: docs/layout.md."""
