import os

import pytest
import torch
from diffusers import DiTPipeline, DiTTransformer2DModel
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file

from fixtures.small_dit import build_pipeline
from fixtures.testing import train_dit as train
from fixtures.testing import transformer_weights
from utils.families.tuning import add_difffit_scales, apply_tuning, fold_difffit_scales, parameter_counts
from utils.infra.errors import UserError


def checkpoint_weights(out, step):
    return load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors"))


def tiny_inputs(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, channels = model.config.sample_size, model.config.in_channels
    return (torch.randn(n, channels, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 1000, (n,), generator=g))


def intended(mode, key, difffit_blocks=1):
    """Whether parameter `key` (as stored in a training checkpoint) is meant to train in `mode`."""
    if mode == "bitfit":
        return key.endswith(".bias")
    if mode == "difffit":
        return key.endswith(".bias") or "class_embedder" in key or key.endswith(".gamma")
    return "lora_" in key


def init_key(mode, key):
    """The pre-trained parameter a checkpoint key corresponds to (None for a new parameter)."""
    if mode == "lora":
        if "lora_" in key:
            return None
        return key.replace("base_model.model.", "").replace(".base_layer", "")
    if key.endswith(".gamma"):
        return None
    return key.replace(".linear.weight", ".weight").replace(".linear.bias", ".bias") if ".to_out.0." in key \
        or ".ff.net.2." in key else key


@pytest.mark.parametrize("mode,method", [("bitfit", "standard"), ("difffit", "diff_tuning"), ("lora", "diff_tuning"),
                                         ("lora", "standard")])
def test_exactly_the_intended_parameters_change(mode, method, tiny_pipeline_dir, digits_dir, tiny_bank_dir,
                                                tmp_path):
    # No --difffit_blocks: the default is the first half of the blocks, block 0 of the tiny model's 2.
    train(tiny_pipeline_dir, digits_dir, tmp_path, "--tuning", mode, "--method", method,
          "--memory_bank", tiny_bank_dir, "--max_train_steps", "3", "--checkpointing_steps", "3")
    init, trained = transformer_weights(tiny_pipeline_dir), checkpoint_weights(tmp_path, 3)
    changed, meant = set(), set()
    for key, value in trained.items():
        source = init_key(mode, key)
        before = init[source] if source is not None else (
            torch.ones_like(value) if key.endswith(".gamma") else None)
        if intended(mode, key):
            meant.add(key)
        if before is None or not torch.equal(before, value):
            changed.add(key)
    frozen = set(trained) - meant
    assert not changed & frozen, f"frozen parameters changed: {sorted(changed & frozen)[:5]}"
    # attn.to_k.bias has zero gradient in exact arithmetic (softmax ignores a shift of all keys), so it may not move.
    assert {k for k in meant if "to_k.bias" not in k} <= changed
    if mode == "difffit":
        gammas = [k for k in trained if k.endswith(".gamma")]
        assert sorted(gammas) == ["transformer_blocks.0.attn1.to_out.0.gamma", "transformer_blocks.0.ff.net.2.gamma"]
    card = ModelCard.load(tmp_path / "README.md")
    assert mode in card.data.tags and "trainable_parameters" in card.text


def test_difffit_folding_is_exact():
    model = build_pipeline().transformer.eval()
    add_difffit_scales(model, 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(torch.rand_like(p) * 2)  # trained gammas are not ones
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        before = model(x, timestep=t, class_labels=y).sample
        fold_difffit_scales(model)
        after = model(x, timestep=t, class_labels=y).sample
    assert (before - after).abs().max() < 1e-5
    stock = build_pipeline().transformer
    assert set(model.state_dict()) == set(stock.state_dict())  # nothing extra to save or load


def test_difffit_output_loads_in_stock_model(tiny_pipeline_dir, digits_dir, tmp_path):
    train(tiny_pipeline_dir, digits_dir, tmp_path, "--method", "standard", "--tuning", "difffit",
          "--difffit_blocks", "2", "--max_train_steps", "3", "--checkpointing_steps", "3")
    model, info = DiTTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # The folded model computes what the trained (unfolded) one did.
    unfolded = DiTTransformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    add_difffit_scales(unfolded, 2)
    unfolded.load_state_dict(checkpoint_weights(tmp_path, 3))
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        diff = (model.eval()(x, timestep=t, class_labels=y).sample
                - unfolded.eval()(x, timestep=t, class_labels=y).sample)
    assert diff.abs().max() < 1e-5


def test_difffit_learning_rate_scale(tiny_pipeline_dir, digits_dir, tmp_path, monkeypatch):
    import train_diff_tuning_dit as script

    seen = []
    real = torch.optim.AdamW

    def recording_adamw(params, lr, **kw):
        seen.append(lr)
        return real(params, lr=lr, **kw)

    monkeypatch.setattr(script.torch.optim, "AdamW", recording_adamw)
    train(tiny_pipeline_dir, digits_dir, tmp_path, "--method", "standard", "--tuning", "difffit",
          "--difffit_blocks", "1", "--max_train_steps", "1", "--learning_rate", "2e-4", "--difffit_lr_scale", "10")
    assert seen == [pytest.approx(2e-3)]


def test_lora_adapter_loads_with_peft_and_matches_merge(tiny_pipeline_dir, digits_dir, tiny_bank_dir, tmp_path):
    args = ["--tuning", "lora", "--lora_rank", "2", "--memory_bank", tiny_bank_dir, "--max_train_steps", "3"]
    train(tiny_pipeline_dir, digits_dir, tmp_path / "adapter", *args)
    train(tiny_pipeline_dir, digits_dir, tmp_path / "merged", *args, "--merge_lora")
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        ".created_by.json", "README.md", "adapter_config.json", "adapter_model.safetensors", "id2label.json",
        "samples.png"]
    base = DiTTransformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    merged = DiTPipeline.from_pretrained(tmp_path / "merged").transformer.eval()
    pristine = DiTTransformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer").eval()
    x, t, y = tiny_inputs(merged)
    with torch.no_grad():
        a, m = adapted(x, timestep=t, class_labels=y).sample, merged(x, timestep=t, class_labels=y).sample
        p = pristine(x, timestep=t, class_labels=y).sample
    assert (a - m).abs().max() < 1e-5 and (a - p).abs().max() > 1e-4
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert "PeftModel.from_pretrained" in card.text and "lora" in card.data.tags


def test_parameter_counts_and_errors():
    model = build_pipeline().transformer
    total = parameter_counts(model)[1]
    bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert parameter_counts(apply_tuning(model, "bitfit")) == (bias, total)
    with pytest.raises(UserError, match="--difffit_blocks must be in 1..2"):
        apply_tuning(build_pipeline().transformer, "difffit", difffit_blocks=3)
    with pytest.raises(UserError, match="--lora_target_modules"):
        apply_tuning(build_pipeline().transformer, "lora", lora_target_modules=["no_such_layer"])
