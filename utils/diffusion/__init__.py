"""The diffusion floor under both `families` and `methods`: forward (noising) processes, timestep weights and
samplers, per-sample losses, the one batch composer (x_0, noise, noisy input, model timesteps, target) and latents.
It imports neither: a family says how its model is fed, a method which rows and timesteps a step uses, and both
build on this."""
