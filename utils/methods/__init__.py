"""The methods: Diff-Tuning (its core, timestep weights, memory banks), DeMe (ranges, loss, channel projections,
merging, the timestep ensemble) and Bi-tuning. Nothing here imports a model family: a script hands one in."""
