"""Merging fine-tuned copies of one model in parameter space (the timestep-wise ensemble, DeMe's "before merge", is
in utils.methods.timestep_ensemble).

theta_merged = theta + combine(theta_i - theta, w_i), where combine is peft's task arithmetic, TIES, DARE-linear or
DARE-TIES. Weights are read tensor by tensor from safetensors files and the merged file is written tensor by tensor
(`save_merged`: its header is known from the base model's), so memory holds one tensor of each input and one merged
tensor at a time, whatever the size and number of models.
"""

import json
import os
import struct

import torch
from peft.utils import merge_utils
from safetensors import safe_open

from ..infra.errors import UserError

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


class SafetensorsWeights:
    """The tensors of one safetensors file (or a sharded index of them), read one at a time on demand.

    Each read opens the file afresh, so no mapping of a whole model stays resident between reads."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, INDEX_NAME)):
                with open(os.path.join(path, INDEX_NAME)) as f:
                    weight_map = json.load(f)["weight_map"]
                self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
            elif os.path.exists(os.path.join(path, WEIGHTS_NAME)):
                self.files = self._keys_of(os.path.join(path, WEIGHTS_NAME))
            else:
                raise UserError(f"{path} has no {WEIGHTS_NAME} (merging reads safetensors weights)")
        elif os.path.exists(path):
            self.files = self._keys_of(path)
        else:
            raise UserError(f"{path} does not exist")
        self.meta = {}
        for file in sorted(set(self.files.values())):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    self.meta[key] = (tuple(s.get_shape()), s.get_dtype())

    @staticmethod
    def _keys_of(file):
        with safe_open(file, "pt") as f:
            return {k: file for k in f.keys()}

    def keys(self):
        return list(self.meta)  # the order of the files' headers, which save_merged keeps

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(key)


class IdentityMaps:
    """The pre-trained value of channel-projection maps (which the base model does not have): identities."""

    def __init__(self, like: SafetensorsWeights):
        self.meta = like.meta

    def keys(self):
        return list(self.meta)

    def get(self, key):
        return torch.eye(self.meta[key][0][0])


def check_compatible(base, models, names):
    """One-line error naming the first tensor whose name, shape or dtype differs between the base and a model."""
    for model, name in zip(models, names):
        missing = [k for k in base.keys() if k not in model.meta]
        extra = [k for k in model.keys() if k not in base.meta]
        if missing or extra:
            first = missing[0] if missing else extra[0]
            raise UserError(f"{name} does not match the base model: tensor {first!r} is "
                            f"{'missing' if missing else 'not in the base model'} ({len(missing)} missing, "
                            f"{len(extra)} extra); models of different architectures cannot be merged")
        for key in base.keys():
            if model.meta[key][0] != base.meta[key][0]:
                raise UserError(f"{name} does not match the base model: tensor {key!r} has shape "
                                f"{list(model.meta[key][0])}, the base {list(base.meta[key][0])}")


def merge_tensors(base, models, weights, method="task_arithmetic", density=1.0, seed=0) -> dict:
    """{name: theta + combine(theta_i - theta, w)} for floating tensors; integer buffers are copied from the base."""
    return dict(iter_merged(base, models, weights, method, density, seed))


def iter_merged(base, models, weights, method="task_arithmetic", density=1.0, seed=0):
    """(name, merged tensor) in the base model's order, one at a time (see merge_tensors)."""
    if method not in MERGE_METHODS:
        raise UserError(f"--merge_method must be one of {MERGE_METHODS}, got {method!r}")
    weights = torch.tensor(weights, dtype=torch.float32)
    torch.manual_seed(seed)  # DARE's random pruning
    for key in base.keys():
        theta = base.get(key)
        if not theta.is_floating_point():
            yield key, theta
            continue
        if method == "task_arithmetic":
            # theta + sum_i w_i (theta_i - theta) = (1 - sum_i w_i) theta + sum_i w_i theta_i: one fused pass per
            # input, one input tensor in memory at a time (all-zero weights still give theta bit for bit).
            merged = theta.float() * (1.0 - float(weights.sum()))
            for model, w in zip(models, weights.tolist()):
                merged.add_(model.get(key), alpha=w)
            yield key, merged.to(theta.dtype).contiguous()
            continue
        deltas = [model.get(key).float() - theta.float() for model in models]
        if method == "ties":
            delta = merge_utils.ties(deltas, weights, density)
        else:
            delta = getattr(merge_utils, method)(deltas, weights, density)
        yield key, (theta.float() + delta).to(theta.dtype).contiguous()


def save_merged(path: str, meta: dict, tensors) -> None:
    """Write a safetensors file from (name, tensor) pairs as they come. `meta` ({name: (shape, dtype)}, as
    `SafetensorsWeights.meta`) gives the header up front; each tensor must match its entry. Bytes as
    `safetensors.torch.save_file` lays them out: an 8-byte header length, the JSON header padded to 8 bytes, then
    the tensors in header order."""
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    header, offset = {}, 0
    for name, (shape, dtype) in meta.items():
        end = offset + sizes[dtype] * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, tensor), expected in zip(tensors, meta):
            if name != expected or list(tensor.shape) != header[name]["shape"]:
                raise ValueError(f"tensor {name} {list(tensor.shape)} does not match the header's {expected}")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += data.nbytes
    if written != offset:
        raise ValueError(f"wrote {written} bytes of tensor data, the header promises {offset}")
