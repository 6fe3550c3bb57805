"""transformers image classifiers as a fine-tuning script needs them: checked from their config before any weights
load, the final classification `Linear` found and replaced by a new head, and the input geometry and
normalisation read from the model's image processor."""

import importlib

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from ..infra.errors import UserError


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


REMOTE_CLASS = "AutoModelForImageClassification"  # the auto_map entry of a model with its own code on the Hub


def load_classifier_config(name: str, revision=None, cache_dir=None, trust_remote_code: bool = False):
    """The model's config, refused in one line when it is missing or not an image classifier (before any weights
    load). timm models (transformers' `timm_wrapper`) need timm, which is imported only for them. A model with its
    own code (an `auto_map` naming an image-classification class) loads only with `trust_remote_code`."""
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, cache_dir=cache_dir,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing folder, a diffusers pipeline (no config.json), offline Hub id...
        if "trust_remote_code" in str(e):
            raise UserError(f"{name} runs its own code (its config names Python files in the repository); pass "
                            "--trust_remote_code if you trust it") from e
        raise UserError(f"cannot load a transformers model config from {name!r}: {_first_line(e)}") from e
    if REMOTE_CLASS in (getattr(config, "auto_map", None) or {}):
        return config  # the repository's own classifier class (trust_remote_code was given: the config loaded)
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(f"{name} is a {config.model_type!r} model, which transformers has no image-classification "
                        "class for (AutoModelForImageClassification); give an image classifier or backbone "
                        "checkpoint such as microsoft/resnet-50 or google/vit-base-patch16-224")
    if config.model_type == "timm_wrapper":
        try:
            importlib.import_module("timm")
        except Exception as e:  # missing, or present but broken: on our pinned stack timm needs torchvision
            raise UserError(f"{name} is a timm model, which needs the timm package (and torchvision, which timm "
                            f"imports): {_first_line(e)}; pip install timm torchvision, or use a transformers-native "
                            "checkpoint") from e
    return config


def classifier_class(config, name: str | None = None, revision=None):
    """The AutoModelForImageClassification class of `config` (without instantiating it): transformers' own, or the
    one a model with its own code names in its `auto_map` (`name`: where that code lives)."""
    remote = (getattr(config, "auto_map", None) or {}).get(REMOTE_CLASS)
    if remote:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote, name, revision=revision)
    return AutoModelForImageClassification._model_mapping[type(config)]


def load_image_processor(name: str, revision=None, cache_dir=None, trust_remote_code: bool = False):
    try:
        return AutoImageProcessor.from_pretrained(name, revision=revision, cache_dir=cache_dir,
                                                  trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load the image processor of {name!r} (its preprocessor_config.json says how images "
                        f"are resized and normalised): {_first_line(e)}") from e


def set_resolution(processor, resolution: int) -> None:
    """Make `processor` produce `resolution` x `resolution` inputs, keeping its resize-then-crop ratio."""
    size = dict(processor.size.items()) if hasattr(processor.size, "items") else dict(processor.size)
    size = {k: v for k, v in size.items() if v is not None}
    crop = getattr(processor, "crop_size", None)
    if "shortest_edge" in size and crop is not None and getattr(processor, "do_center_crop", False):
        ratio = size["shortest_edge"] / crop["height"]
        processor.size = {"shortest_edge": round(resolution * ratio)}
        processor.crop_size = {"height": resolution, "width": resolution}
    elif "shortest_edge" in size:
        processor.size = {"shortest_edge": resolution}  # ConvNeXt / ResNet: resize by crop_pct, crop to this
    else:
        processor.size = {"height": resolution, "width": resolution}
        if crop is not None:
            processor.crop_size = {"height": resolution, "width": resolution}


def input_size(processor) -> tuple[int, int]:
    """(height, width) of what the processor feeds the model, measured on a blank image."""
    pixels = processor(Image.new("RGB", (97, 83)), return_tensors="pt")["pixel_values"]
    return tuple(pixels.shape[-2:])


def normalisation(processor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(rescale factor, mean, std) the processor applies to 0..255 pixels (mean 0, std 1 when it does not)."""
    scale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
    if getattr(processor, "do_normalize", True):
        mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    else:
        mean, std = torch.zeros(3), torch.ones(3)
    return float(scale), mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def find_head(model, size: tuple[int, int], channels: int = 3) -> str:
    """The module path of the model's final classification `Linear`: the one whose output IS the logits (found on
    a blank batch in eval mode). A model whose logits are not one Linear's output (two heads averaged, as DeiT's
    distilled classifier) or whose head input is not (batch, features) is refused in one line."""
    outputs = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: a forward hook's return value would replace the output
            outputs.setdefault(name, (output, inputs[0]))
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(pixel_values=torch.zeros(2, channels, *size)).logits
    except Exception as e:
        raise UserError(f"the model cannot take the {size[0]}x{size[1]} images its image processor makes "
                        f"({type(e).__name__}: {_first_line(e)}); pass a --resolution it accepts") from e
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    heads = [name for name, (out, _) in outputs.items() if out is logits]
    if len(heads) != 1:
        raise UserError(f"{type(model).__name__} has no single final classification Linear whose output is the logits "
                        "(e.g. two heads averaged); Bi-tuning needs the features that feed one head")
    if outputs[heads[0]][1].dim() != 2:
        raise UserError(f"{type(model).__name__}'s head {heads[0]} takes {outputs[heads[0]][1].dim()}-d inputs, not "
                        "(batch, features)")
    return heads[0]


def new_head(in_features: int, num_classes: int) -> torch.nn.Linear:
    """A fresh classification layer, weight N(0, 0.01), bias 0 (the reference's init). Always new: from_pretrained
    keeps an old head of the same size silently."""
    head = torch.nn.Linear(in_features, num_classes)
    torch.nn.init.normal_(head.weight, 0.0, 0.01)
    torch.nn.init.zeros_(head.bias)
    return head


def replace_head(model, path: str, num_classes: int) -> torch.nn.Linear:
    """Put a new head of `num_classes` outputs at `path`; the saved keys stay the stock class's."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    head = new_head(getattr(parent, name).in_features, num_classes)
    setattr(parent, name, head)
    return head
