"""The timestep-wise ensemble: N models, model i used for the timesteps of range i. DeMe's "before merge", and
the chain of forgetting's handoff (the fine-tuned model for the first steps, another for the last ones)."""

import json
import os

import diffusers
import torch

from .channel_projection import attach_saved_projections, save_unet

ENSEMBLE_CONFIG = "ensemble.json"


class TimestepEnsemble(torch.nn.Module):
    """N models, model i used for timesteps in range i: DeMe's "before merge". It stands in for the UNet of a stock
    pipeline (same call, `config`, `dtype`, `device`), N times the weights of one model.

        pipe = DDIMPipeline(unet=TimestepEnsemble.from_pretrained("ensemble"),
                            scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"))
    """

    def __init__(self, models, ranges):
        super().__init__()
        if len(models) != len(ranges):
            raise ValueError("one timestep range per model")
        self.models = torch.nn.ModuleList(models)
        self.ranges = [tuple(r) for r in ranges]
        self.register_buffer("_upper", torch.tensor([hi for _, hi in self.ranges]), persistent=False)

    @property
    def config(self):
        return self.models[0].config

    @property
    def dtype(self):
        return self.models[0].dtype

    @property
    def device(self):
        return self.models[0].device

    def model_index(self, timestep, batch_size) -> torch.Tensor:
        """Which model serves each sample."""
        t = torch.as_tensor(timestep, device=self._upper.device).reshape(-1).expand(batch_size)
        return torch.bucketize(t.long().contiguous(), self._upper, right=True).clamp(max=len(self.models) - 1)

    def forward(self, sample, timestep, *args, return_dict=True, **kwargs):
        which = self.model_index(timestep, len(sample))
        if (which == which[0]).all():
            return self.models[int(which[0])](sample, timestep, *args, return_dict=return_dict, **kwargs)
        out = torch.empty_like(sample)  # mixed timesteps (a training-style batch): each group to its model
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(len(sample))
        for i in which.unique().tolist():
            rows = which == i

            def pick(x):
                return x[rows] if torch.is_tensor(x) and x.dim() > 0 and len(x) == len(sample) else x

            result = self.models[i](sample[rows], t[rows], *map(pick, args),
                                    **{k: pick(v) for k, v in kwargs.items()}, return_dict=False)
            out[rows] = result[0].to(out.dtype)
        return _wrap(self.models[0], out) if return_dict else (out,)

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        entries = []
        for i, (model, r) in enumerate(zip(self.models, self.ranges)):
            save_unet(model, os.path.join(folder, f"range_{i}"))  # official channel projections beside the weights
            entries.append({"folder": f"range_{i}", "timesteps": list(r), "class": type(model).__name__})
        with open(os.path.join(folder, ENSEMBLE_CONFIG), "w") as f:
            json.dump({"models": entries}, f, indent=2)

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """The saved ensemble; a model saved with official-placement channel projections gets them back (a stock
        `from_pretrained` would silently compute without them)."""
        with open(os.path.join(folder, ENSEMBLE_CONFIG)) as f:
            entries = json.load(f)["models"]
        models = [attach_saved_projections(getattr(diffusers, e["class"]).from_pretrained(
            os.path.join(folder, e["folder"]), **kwargs), os.path.join(folder, e["folder"])) for e in entries]
        return cls(models, [e["timesteps"] for e in entries])


def _wrap(model, sample):
    """The output type the model itself returns (UNet2DOutput or UNet2DConditionOutput) around `sample`."""
    from diffusers.models.unets.unet_2d import UNet2DOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return (UNet2DConditionOutput if isinstance(model, diffusers.UNet2DConditionModel) else UNet2DOutput)(sample=sample)
