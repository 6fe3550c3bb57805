"""The methods: Diff-Tuning (its core object and memory banks), DeMe (ranges, loss, channel projections, merging,
the timestep ensemble) and Bi-tuning, each one object a script calls. Nothing here imports a model family: a
script hands one in; what both need (forward processes, timestep weights, losses, the batch composer) is in
`utils.diffusion`."""
