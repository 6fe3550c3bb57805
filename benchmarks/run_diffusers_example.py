"""Run one of diffusers' example scripts with the torchvision stand-in (benchmarks/torchvision_stand_in):
`python benchmarks/run_diffusers_example.py <script> <args>`.
transformers, diffusers and peft are imported first, so their own checks still find no torchvision (they would
reach for parts the stand-in does not have); then the stand-in goes on the path for the example's
`from torchvision import transforms`."""

import os
import runpy
import sys

import diffusers  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "torchvision_stand_in"))
sys.path.insert(1, os.path.dirname(HERE))  # the repository, for utils.infra.image_transforms
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
