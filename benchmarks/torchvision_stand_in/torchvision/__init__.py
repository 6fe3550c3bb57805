"""A stand-in for the few torchvision ops diffusers' text-to-image example uses (torchvision does not import beside
our pinned torch). Only benchmarks/diffusers_parity.py puts it on the path, to run that example as it is."""
