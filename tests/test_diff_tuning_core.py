"""The Diff-Tuning core (utils.methods.diff_tuning.DiffTuning) tested directly, with the DiT and ControlNet families
and with a hand-made family: batch composition, condition dropout, timesteps, the split loss, and the one bank
check."""

import contextlib
import json
import os
import shutil

import datasets
import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline, StableDiffusionPipeline

from utils.diffusion.timesteps import retention_weights
from utils.families.base import Family, Rows
from utils.families.controlnet import ControlNetOnSD
from utils.families.dit import DiT, latent_shape
from utils.families.stable_diffusion import StableDiffusion
from utils.infra.data import ArrowBatches
from utils.infra.errors import UserError
from utils.methods import memory_bank
from utils.methods.diff_tuning import DiffTuning


def dit_family(pipeline_dir, random_flip=True):
    pipe = DiTPipeline.from_pretrained(pipeline_dir)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe, scheduler, DiT(pipe.transformer, pipe.vae, scheduler, "cpu", random_flip)


def bank_rows(bank_dir, n):
    rows = ArrowBatches(datasets.load_from_disk(bank_dir), DiT.bank_columns())
    return rows.__getitems__(list(range(n)))


@pytest.mark.parametrize("ratio,batch,expected", [(0.5, 8, 4), (0.2, 10, 2), (0.25, 8, 2)])
def test_dit_batch_bank_rows_first_with_the_null_class_and_dropout_on_data_rows_only(
        tiny_pipeline_dir, tiny_bank_dir, ratio, batch, expected):
    pipe, scheduler, family = dit_family(tiny_pipeline_dir)
    core = DiffTuning(scheduler, retention_ratio=ratio, batch_size=batch, condition_dropout=0.5)
    assert core.n_bank == expected == round(ratio * batch) and core.n_data == batch - expected
    dropped = kept = 0
    bank_t, data_t = [], []
    for step in range(40):
        labels = torch.randint(0, 10, (core.n_data,), generator=torch.Generator().manual_seed(step))
        data = {"labels": labels, "pixel_values": torch.rand(core.n_data, 3, 8, 8) * 2 - 1}
        b = core.batch(family, data, bank_rows(tiny_bank_dir, core.n_bank), torch.Generator().manual_seed(step))
        assert b.n_bank == expected and len(b.x0) == len(b.timesteps) == len(b.cond["class_labels"]) == batch
        assert (b.cond["class_labels"][:expected] == 1000).all()  # retention rows: always the null class
        downstream = b.cond["class_labels"][expected:]
        is_dropped = downstream == 1000
        assert torch.equal(downstream[~is_dropped], labels[~is_dropped])
        dropped, kept = dropped + int(is_dropped.sum()), kept + int((~is_dropped).sum())
        torch.testing.assert_close(b.noisy, scheduler.add_noise(b.x0, b.noise, b.timesteps))
        assert torch.equal(b.target, b.noise)  # DiT predicts epsilon
        bank_t.append(b.timesteps[:expected])
        data_t.append(b.timesteps[expected:])
    assert dropped > 0 and kept > 0
    # xi puts bank rows at small t (mean T/3 for tau = 1), psi data rows at large t (mean 2T/3)
    assert torch.cat(bank_t).float().mean() < 450 < 550 < torch.cat(data_t).float().mean()


def test_standard_fine_tuning_has_no_bank_rows_and_uniform_timesteps(tiny_pipeline_dir):
    _, scheduler, family = dit_family(tiny_pipeline_dir)
    core = DiffTuning(scheduler, method="standard", batch_size=8)
    assert core.n_bank == 0 and not core.uses_bank
    t = torch.cat([core.batch(family, {"labels": torch.zeros(8, dtype=torch.long),
                                       "pixel_values": torch.zeros(8, 3, 8, 8)}, None,
                              torch.Generator().manual_seed(s)).timesteps for s in range(60)])
    assert abs(t.float().mean().item() - 499.5) < 40


@pytest.mark.parametrize("weighting", ["power", "snr"])
def test_standard_samples_uniform_timesteps_whatever_the_weighting(weighting):
    scheduler = DDPMScheduler()
    core = DiffTuning(scheduler, method="standard", weighting=weighting, batch_size=8)
    assert torch.allclose(core.timesteps.adapt.probs, torch.full((1000,), 1e-3))
    t = core.timesteps.sample(0, 200_000, torch.Generator().manual_seed(0), "cpu")
    assert abs(t.float().mean().item() - 499.5) < 3  # psi = 1/(1+SNR) would give a mean near 622
    snr = DiffTuning(scheduler, method="diff_tuning", weighting="snr", batch_size=8)
    assert snr.timesteps.sample(0, 200_000, torch.Generator().manual_seed(0), "cpu").float().mean() > 600


def test_the_batch_is_a_function_of_the_generator_alone(tiny_pipeline_dir, tiny_bank_dir):
    _, scheduler, family = dit_family(tiny_pipeline_dir)
    core = DiffTuning(scheduler, batch_size=8, condition_dropout=0.3)
    data = {"labels": torch.arange(4), "pixel_values": torch.rand(4, 3, 8, 8)}
    one, two = (core.batch(family, data, bank_rows(tiny_bank_dir, 4), torch.Generator().manual_seed(7))
                for _ in range(2))
    for a, b in ((one.x0, two.x0), (one.timesteps, two.timesteps), (one.noise, two.noise),
                 (one.cond["class_labels"], two.cond["class_labels"])):
        assert torch.equal(a, b)
    other = core.batch(family, data, bank_rows(tiny_bank_dir, 4), torch.Generator().manual_seed(8))
    assert not torch.equal(one.noise, other.noise)


def test_cached_moments_give_the_latents_that_encoding_gives(tiny_pipeline_dir):
    """Stored posteriors (image and mirror) feed the model exactly what encoding the pixels would, flips included."""
    from utils.diffusion.latents import encode_moments

    pipe, scheduler, family = dit_family(tiny_pipeline_dir)
    core = DiffTuning(scheduler, method="standard", batch_size=6)
    pixels = torch.rand(6, 3, 8, 8) * 2 - 1
    moments, flipped = encode_moments(pipe.vae, pixels)
    labels = torch.arange(6)
    encoded = core.batch(family, {"labels": labels, "pixel_values": pixels}, None, torch.Generator().manual_seed(3))
    cached = core.batch(family, {"labels": labels, "latent_moments": moments, "latent_moments_flipped": flipped},
                        None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(encoded.x0, cached.x0, atol=1e-5, rtol=1e-5)
    assert torch.equal(encoded.timesteps, cached.timesteps)


class Constant(Family):
    """A hand-made family: the per-sample loss is the row's x (so the split is checked by hand)."""

    def __init__(self, scheduler):
        super().__init__(scheduler, "cpu")

    def rows(self, batch, generator):
        return Rows(batch["x"], {})

    def bank_rows(self, batch, generator):
        return Rows(batch["x"], {})

    def loss(self, net, batch):
        return batch.x0.flatten(1).mean(1) * net


@pytest.mark.parametrize("weight", [1.0, 0.1])
def test_loss_is_adaptation_plus_weighted_retention_over_the_family_losses(weight):
    scheduler = DDPMScheduler()
    core = DiffTuning(scheduler, retention_ratio=0.25, retention_weight=weight, batch_size=8)
    data, bank = {"x": torch.arange(6.0).view(6, 1)}, {"x": torch.tensor([[10.0], [20.0]])}
    net = torch.tensor(2.0, requires_grad=True)
    loss, parts = core(Constant(scheduler), net, data, bank, torch.Generator().manual_seed(0))
    assert parts["loss_adapt"].item() == pytest.approx(2 * 2.5) and parts["loss_retain"].item() == pytest.approx(30)
    assert loss.item() == pytest.approx(5 + weight * 30)
    loss.backward()
    assert net.grad.item() == pytest.approx(2.5 + weight * 15)


def controlnet_family(sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tok = pipe.tokenizer

    def tokenize(captions):
        return tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids

    text = StableDiffusion(pipe, "cpu")  # the base's text-to-image family: tokenizer, encoder, VAE
    family = ControlNetOnSD(text, scheduler, pipe.unet, "a bank prompt", contextlib.nullcontext, torch.float32, 16,
                            "canny")
    return pipe, scheduler, family, tokenize


def test_controlnet_batch_bank_prompt_own_controls_empty_prompt_dropout_and_xi(tiny_sd_dir):
    pipe, scheduler, family, tokenize = controlnet_family(tiny_sd_dir)
    core = DiffTuning(scheduler, retention_ratio=0.5, batch_size=6, condition_dropout=0.5)
    xi = retention_weights(1000, 1.0)
    latent = (2 * pipe.vae.config.latent_channels, 8, 8)
    dropped = kept = 0
    for step in range(10):
        g = torch.Generator().manual_seed(100 + step)
        data = {"pixel_values": torch.rand(3, 3, 16, 16, generator=g) * 2 - 1,
                "conditioning_pixel_values": torch.rand(3, 3, 16, 16, generator=g),
                "captions": ["a digit one", ["a digit two", "the digit two"], "a digit three"]}
        bank = {"latent_moments": torch.randn(3, *latent, generator=g),
                "conditioning_pixel_values": torch.rand(3, 3, 16, 16, generator=g)}
        b = core.batch(family, data, bank, torch.Generator().manual_seed(step))
        assert b.n_bank == 3 and len(b.x0) == len(b.timesteps) == 6
        ids = family.rows(data, torch.Generator()).cond["input_ids"]  # any caption choice: row 1's two differ
        hidden = b.cond["encoder_hidden_states"]
        bank_hidden = pipe.text_encoder(tokenize(["a bank prompt"]))[0]
        empty_hidden = pipe.text_encoder(tokenize([""]))[0]
        assert all(torch.allclose(hidden[i], bank_hidden[0]) for i in range(3))  # bank rows: the bank prompt
        assert torch.equal(b.cond["controls"][:3], bank["conditioning_pixel_values"])  # their own controls
        assert torch.equal(b.cond["controls"][3:], data["conditioning_pixel_values"])
        assert (xi[b.timesteps[:3]] > 0).all()
        for i in range(3):
            is_empty = torch.allclose(hidden[3 + i], empty_hidden[0])
            dropped, kept = dropped + is_empty, kept + (not is_empty)
            if i != 1 and not is_empty:
                assert torch.allclose(hidden[3 + i], pipe.text_encoder(ids[i:i + 1])[0][0])
    assert dropped > 0 and kept > 0


def test_controlnet_rows_draw_among_every_caption_of_a_list(tiny_sd_dir):
    _, _, family, tokenize = controlnet_family(tiny_sd_dir)
    captions = [["a digit one", "the digit one", "one, handwritten"]]
    data = {"captions": captions * 2, "pixel_values": torch.zeros(2, 3, 16, 16),
            "conditioning_pixel_values": torch.zeros(2, 3, 16, 16)}
    options = {tuple(tokenize([c])[0].tolist()) for c in captions[0]}
    picked = set()
    for step in range(12):
        ids = family.rows(data, torch.Generator().manual_seed(step)).cond["input_ids"]
        picked |= {tuple(row.tolist()) for row in ids}
    assert picked <= options and len(picked) > 1  # every caption of the list is used, and only those


# ---- The one bank check (memory_bank.check_memory_bank): family, model, shape, rows, damage.

def test_bank_check_refuses_another_family_model_or_too_few_rows(tiny_pipeline_dir, tiny_bank_dir, tmp_path):
    from diffusers import DiTTransformer2DModel

    config = DiTTransformer2DModel.load_config(tiny_pipeline_dir, subfolder="transformer")
    record = {"family": "dit", "base_model": tiny_pipeline_dir, "latent_shape": list(latent_shape(config))}
    memory_bank.check_memory_bank(tiny_bank_dir, record, min_rows=16)  # the bank made for it passes
    with pytest.raises(UserError, match="has 16 rows, fewer than one batch"):
        memory_bank.check_memory_bank(tiny_bank_dir, record, min_rows=17)
    with pytest.raises(UserError, match="was made with base_model"):
        memory_bank.check_memory_bank(tiny_bank_dir, {**record, "base_model": "another/dit"})
    with pytest.raises(UserError, match="was made with family = 'dit'"):
        memory_bank.check_memory_bank(tiny_bank_dir, {**record, "family": "controlnet"})
    with pytest.raises(UserError, match="was made with latent_shape"):
        memory_bank.check_memory_bank(tiny_bank_dir, {**record, "latent_shape": [8, 8, 8]})
    with pytest.raises(UserError, match="--memory_bank_size 3 is smaller than one batch"):
        memory_bank.check_memory_bank(str(tmp_path / "new"), record, min_rows=4, size_if_generated=3)

    # A bank of an earlier version records no family: it is read from the columns.
    old = shutil.copytree(tiny_bank_dir, tmp_path / "old")
    info = json.loads((old / memory_bank.CONFIG_NAME).read_text())
    (old / memory_bank.CONFIG_NAME).write_text(json.dumps({k: v for k, v in info.items()
                                                           if k not in ("family", "latent_shape")}))
    memory_bank.check_memory_bank(str(old), record, min_rows=16)

    # A truncated Arrow file: one line, not a pyarrow error.
    damaged = shutil.copytree(tiny_bank_dir, tmp_path / "damaged")
    arrow = next(f for f in os.listdir(damaged) if f.endswith(".arrow"))
    with open(damaged / arrow, "r+b") as f:
        f.truncate(os.path.getsize(damaged / arrow) // 2)
    with pytest.raises(UserError, match="cannot be read: it is damaged"):
        memory_bank.check_memory_bank(str(damaged), record)


def test_bank_generation_says_early_how_long_it_will_take(tiny_pipeline_dir, tmp_path, caplog):
    import logging

    from utils.families.dit import DiTBankSampler

    pipe = DiTPipeline.from_pretrained(tiny_pipeline_dir)
    with caplog.at_level(logging.INFO, logger="utils.methods.memory_bank"):
        memory_bank.generate_shards(DiTBankSampler(pipe, num_inference_steps=2), str(tmp_path / "bank"), 6,
                                    batch_size=2)
    said = [r.getMessage() for r in caplog.records if "more shard(s)" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("memory bank: 2 more shard(s) of 2 samples on this process, about")
    assert "generate_memory_bank.py" in said[0]


def test_retention_ratio_zero_is_the_adaptation_only_ablation(tiny_pipeline_dir, digits_dir, tmp_path):
    """An explicit --retention_ratio 0: no bank is generated or read, and the data rows keep psi's timesteps (mean
    2T/3 at tau 1), unlike standard fine-tuning's uniform ones; a ratio that rounds to 0 stays refused."""
    import train_diff_tuning_dit
    from fixtures.testing import cli_error, train_dit

    _, scheduler, family = dit_family(tiny_pipeline_dir)
    core = DiffTuning(scheduler, retention_ratio=0.0, batch_size=8)
    assert core.n_bank == 0 and not core.uses_bank
    times = torch.cat([core.batch(family, {"labels": torch.zeros(8, dtype=torch.long),
                                           "pixel_values": torch.rand(8, 3, 8, 8) * 2 - 1}, None,
                                  torch.Generator().manual_seed(s)).timesteps for s in range(100)]).float()
    assert 620 < times.mean() < 710
    train_dit(tiny_pipeline_dir, digits_dir, tmp_path / "out", "--retention_ratio", "0", "--max_train_steps", "2",
              "--checkpointing_steps", "2")
    assert not (tmp_path / "out" / "memory_bank").exists() and (tmp_path / "out" / "model_index.json").exists()
    assert "rounds to 0 memory-bank samples" in cli_error(train_diff_tuning_dit, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir, "--output_dir",
        str(tmp_path / "n"), "--retention_ratio", "0.01"])
