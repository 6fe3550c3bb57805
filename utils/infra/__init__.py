"""The infrastructure every script shares and no method knows: training conventions (flags, Accelerator,
optimizer, EMA, logging), checkpoints and resume, data loading and checks, output safety, Hub cards and pushes,
errors and augmentation."""
