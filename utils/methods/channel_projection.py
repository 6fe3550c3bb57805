"""DeMe's channel-wise projection: identity-initialised learnable C x C maps on a UNet's intermediate features.

Two placements:
- `foldable` (ours, the default): the map multiplies the output of an existing convolution, one per down, mid and up
  block: the block's downsampler/upsampler conv when it has one, else its last resnet's second conv. P (W x + b) =
  (P W) x + P b, so `fold_projections` puts each map into its conv exactly and the saved model is a stock diffusers
  UNet with no extra inference cost.
- `official` (as MqLeet/DeMe): a 1x1 map after each down block's output, the mid block and each up block. It acts
  on a sum of branches and cannot be folded; the maps are saved beside the stock weights in `PROJECTION_FILE`, a
  stock `from_pretrained` ignores them (and then computes something else), and `attach_saved_projections` puts
  them back.
"""

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PLACEMENTS = ("foldable", "official", "none")
PROJECTION_FILE = "channel_projection.safetensors"


def _mix(projection: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bc...->bo...", projection.to(x.dtype), x)


class ProjectedConv(nn.Module):
    """A conv followed by a learnable C_out x C_out channel map, initialised to the identity."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.projection = nn.Parameter(torch.eye(conv.out_channels, device=conv.weight.device))

    def forward(self, x):
        return _mix(self.projection, self.conv(x))

    def folded(self) -> nn.Conv2d:
        """The conv with the map folded in: W' = P W, b' = P b."""
        with torch.no_grad():
            p = self.projection.to(torch.float64)
            w = self.conv.weight
            w.copy_((p @ w.to(torch.float64).flatten(1)).view_as(w).to(w.dtype))
            if self.conv.bias is not None:
                self.conv.bias.copy_((p @ self.conv.bias.to(torch.float64)).to(self.conv.bias.dtype))
        return self.conv


class BlockProjection(nn.Module):
    """The official placement: a map applied to a block's output through a forward hook."""

    def __init__(self, channels: int, device=None):
        super().__init__()
        self.projection = nn.Parameter(torch.eye(channels, device=device))

    def hook(self, module, inputs, output):
        if isinstance(output, tuple):  # down blocks return (hidden_states, skip connections)
            return (_mix(self.projection, output[0]), *output[1:])
        return _mix(self.projection, output)


def _blocks(unet):
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def _foldable_site(block):
    """(module, attribute) of the conv whose output the block's map multiplies: the block's down/upsampler conv
    (last in the block's forward) if it has one, else the second conv of its last resnet."""
    samplers = [*(getattr(block, "downsamplers", None) or []), *(getattr(block, "upsamplers", None) or [])]
    for module in [*samplers[-1:], block.resnets[-1]]:
        for name in ("conv", "conv2"):
            if isinstance(getattr(module, name, None), nn.Conv2d):
                return module, name
    raise ValueError(f"{type(block).__name__} has no conv to fold a channel projection into")


def add_projections(unet, placement: str) -> list[nn.Parameter]:
    """Add identity maps to `unet` in place; returns the new parameters."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    params = []
    for block in _blocks(unet) if placement != "none" else []:
        if placement == "foldable":
            parent, name = _foldable_site(block)
            wrapped = ProjectedConv(getattr(parent, name))
            setattr(parent, name, wrapped)
        else:
            channels = block.resnets[-1].out_channels
            wrapped = BlockProjection(channels, device=unet.device)
            block.channel_projection = wrapped  # registered as a submodule: trained, checkpointed
            wrapped.handle = block.register_forward_hook(wrapped.hook)
        params.append(wrapped.projection)
    return params


def fold_projections(unet) -> None:
    """Replace every ProjectedConv by its conv with the map folded in: a stock UNet again."""
    for module in list(unet.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ProjectedConv):
                setattr(module, name, child.folded())


def split_official_projections(unet) -> dict[str, torch.Tensor]:
    """Remove the official-placement maps (and their hooks) from `unet`; returns them keyed by block."""
    maps = {}
    for i, block in enumerate(_blocks(unet)):
        if isinstance(getattr(block, "channel_projection", None), BlockProjection):
            maps[f"block_{i}"] = block.channel_projection.projection.detach().float().cpu().contiguous()
            block.channel_projection.handle.remove()
            del block.channel_projection
    return maps


def save_official_projections(maps: dict[str, torch.Tensor], folder: str) -> None:
    save_file(maps, os.path.join(folder, PROJECTION_FILE))


def attach_saved_projections(unet, folder: str):
    """Re-attach the maps saved with an `official`-placement model (no-op if the folder has none). Returns unet."""
    path = os.path.join(folder, PROJECTION_FILE)
    if not os.path.exists(path):
        return unet
    return load_official_projections(unet, load_file(path))


def load_official_projections(unet, maps: dict[str, torch.Tensor]):
    """Put official-placement maps (keyed by block, as saved) into `unet`, attaching identity maps first where it
    has none. Returns unet."""
    blocks = _blocks(unet)
    if not all(isinstance(getattr(b, "channel_projection", None), BlockProjection) for b in blocks):
        add_projections(unet, "official")
    for i, block in enumerate(blocks):
        with torch.no_grad():
            block.channel_projection.projection.copy_(maps[f"block_{i}"])
    return unet


def save_unet(unet, folder: str) -> None:
    """`save_pretrained`, with official-placement maps (if attached) written beside the stock weights instead of
    into them; the model keeps its maps."""
    maps = split_official_projections(unet)
    unet.save_pretrained(folder)
    if maps:
        save_official_projections(maps, folder)
        attach_saved_projections(unet, folder)
