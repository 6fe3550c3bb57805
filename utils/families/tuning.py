"""Which parameters train: full fine-tuning, bias-only (BitFit), DiffFit, and LoRA through peft.

Every mode leaves a model that saves as a stock diffusers model (LoRA: a stock peft adapter, or merged weights):
- `bitfit`: only bias terms train.
- `difffit` (Xie et al., 2023): bias terms, normalisation parameters and the class embedding train, plus new
  ones-initialised per-channel scale factors gamma on the attention output and on the feed-forward output (the
  two residual branches) of the first `num_blocks` transformer blocks. gamma * (W x + b) = (gamma W) x + gamma b,
  so `fold_difffit_scales` puts each gamma into the linear layer it follows, exactly, before saving.
- `lora`: low-rank adapters from `peft` on the attention and feed-forward projections.
"""

import torch
from torch import nn

from ..infra.errors import UserError

TUNING_MODES = ("full", "bitfit", "difffit", "lora")
# DiT (diffusers names): attention projections and both feed-forward layers of every block.
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


class ScaledLinear(nn.Module):
    """A linear layer followed by a learnable per-output-channel scale gamma, initialised to ones."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.gamma = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device))

    def forward(self, x):
        return self.linear(x) * self.gamma

    def folded(self) -> nn.Linear:
        with torch.no_grad():
            self.linear.weight.mul_(self.gamma[:, None].to(self.linear.weight.dtype))
            if self.linear.bias is not None:
                self.linear.bias.mul_(self.gamma.to(self.linear.bias.dtype))
        return self.linear


def difffit_block_count(model, num_blocks: int | None) -> int:
    """`--difffit_blocks` for `model`, checked; None gives the first half of its blocks (the paper's 14 of 28)."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise UserError(f"--tuning difffit needs a model with transformer_blocks; {type(model).__name__} has none")
    if num_blocks is None:
        return max(1, len(blocks) // 2)
    if not 0 < num_blocks <= len(blocks):
        raise UserError(f"--difffit_blocks must be in 1..{len(blocks)} for this model, got {num_blocks}")
    return num_blocks


def _difffit_sites(model, num_blocks):
    """(parent ModuleList, index) of the attention-output and feed-forward-output linears of the first blocks."""
    blocks = model.transformer_blocks[:difffit_block_count(model, num_blocks)]
    return [(site, len(site) - 1 if site is block.ff.net else 0)
            for block in blocks for site in (block.attn1.to_out, block.ff.net)]


def add_difffit_scales(model, num_blocks: int | None) -> None:
    for parent, index in _difffit_sites(model, num_blocks):
        parent[index] = ScaledLinear(parent[index])


def fold_difffit_scales(model) -> None:
    """Replace every ScaledLinear by its linear layer with gamma folded in: a stock model again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ScaledLinear):
                setattr(module, name, child.folded())  # also right for ModuleList entries ("0", "2")


def _is_difffit_parameter(module_name, module, param_name):
    return (param_name == "bias" or param_name == "gamma" or isinstance(module, NORM_TYPES)
            or "class_embedder" in module_name)


def apply_tuning(model, mode: str, difffit_blocks: int | None = None, lora_rank: int = 4,
                 lora_alpha: float | None = None, lora_target_modules=None):
    """Set up `model` for `mode` and return the model to train (a `PeftModel` for lora)."""
    if mode not in TUNING_MODES:
        raise UserError(f"--tuning must be one of {TUNING_MODES}, got {mode!r}")
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        if lora_rank < 1:
            raise UserError(f"--lora_rank must be >= 1, got {lora_rank}")
        targets = lora_target_modules or DEFAULT_LORA_TARGETS
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=targets,
                            init_lora_weights="gaussian")
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise UserError(f"--lora_target_modules {targets}: {str(e).splitlines()[0]}") from e
    if mode == "difffit":
        add_difffit_scales(model, difffit_blocks)
    model.requires_grad_(False)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param_name == "bias" or (mode == "difffit" and _is_difffit_parameter(module_name, module, param_name)):
                param.requires_grad_(True)
    return model


def stock_model(model):
    """The diffusers model inside a peft wrapper (adapters still active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# diffusers' LoRA training scripts put adapters on the attention projections of the UNet and the text encoder
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora_adapter(model, rank: int, targets: list[str], alpha: float | None = None, dropout: float = 0.0,
                     use_dora: bool = False) -> None:
    """peft LoRA adapters on `targets` of a diffusers or transformers model, as diffusers' LoRA scripts add them
    (`add_adapter`, Gaussian init of A, zero B: the model starts unchanged; `dropout`: their --lora_dropout;
    `use_dora`: DoRA's weight-decomposed adapters, their --use_dora); only the adapters train."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                 target_modules=targets, lora_dropout=dropout, **({"use_dora": True} if use_dora
                                                                                  else {})))


def check_lora_targets(model, layers: list[str] | None = None, blocks: list[int] | None = None) -> None:
    """A user's --lora_layers each name modules of `model` (peft matches a name ending in it; it skips a target no
    module has, and fails only when none matches, so a typo would otherwise pass) and --lora_blocks each name one
    of its `transformer_blocks`."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in layers or [] if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise UserError(f"--lora_layers: no module of the {type(model).__name__} is called {', '.join(missing)} "
                        f"(e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:8])})")
    count = sum(1 for n in names if n.count(".") == 1 and n.startswith("transformer_blocks."))
    wrong = [b for b in blocks or [] if not 0 <= b < count]
    if wrong:
        raise UserError(f"--lora_blocks: the {type(model).__name__} has transformer blocks 0..{count - 1}, not "
                        f"{', '.join(map(str, wrong))}")


def lora_layers(model, diffusers_format: bool = True) -> dict:
    """The adapters' weights as `save_lora_weights` takes them and `load_lora_weights` reads them back: converted to
    diffusers' format for UNet pipelines, peft's own for transformer pipelines (SD3), as diffusers' scripts save."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model)
    return convert_state_dict_to_diffusers(layers) if diffusers_format else layers
