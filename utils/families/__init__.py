"""The model families: how each kind of model is detected from its pipeline folder, fed, conditioned, predicts,
samples and makes memory-bank rows (DiT, DDPM UNet, Stable Diffusion UNet, ControlNet), with the parameter-efficient
modes, image classifiers and control annotators."""
