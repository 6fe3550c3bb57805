"""The Stable Diffusion XL family (utils.families.sdxl) against diffusers' own SDXL pipeline on a tiny SDXL built
from configs: the same text embeddings, the same added time ids, the same UNet call; and the Diff-Tuning core
training it."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image

from utils.families.registry import detect_family
from utils.families.sdxl import StableDiffusionXL
from utils.families.stable_diffusion import StableDiffusion
from utils.infra.errors import UserError
from utils.methods.diff_tuning import DiffTuning

PROMPTS = ["a digit seven", "a handwritten digit three"]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    return pipe, StableDiffusionXL(pipe, "cpu")


def test_the_folder_is_detected_as_sdxl_and_refused_by_a_stable_diffusion_only_entry_point(tiny_sdxl_dir):
    assert detect_family(tiny_sdxl_dir, [StableDiffusion, StableDiffusionXL], "x") is StableDiffusionXL
    with pytest.raises(UserError, match=r"is a StableDiffusionXLPipeline \(text_encoder_2 "
                                        r"CLIPTextModelWithProjection, unet .*\); x takes a Stable Diffusion 1.x/2.x"):
        detect_family(tiny_sdxl_dir, [StableDiffusion], "x")


@torch.no_grad()
def test_text_embeddings_equal_the_pipelines_encode_prompt(sdxl):
    pipe, family = sdxl
    hidden, pooled = family.embed(family.tokenize(PROMPTS))
    expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    assert family.tokenize(PROMPTS).shape[:2] == (2, 2)


@torch.no_grad()
def test_prediction_equals_the_pipelines_unet_call_with_its_time_ids(sdxl):
    pipe, family = sdxl
    ids = family.tokenize(PROMPTS)
    hidden, pooled = family.embed(ids)
    time_ids = family.time_ids(torch.tensor([[16, 16, 0, 0]] * 2), 16)
    expected_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids.float(), expected_ids.expand(2, -1))
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    cond = family.encode({"input_ids": ids, "time_ids": time_ids})
    expected = pipe.unet(noisy, t, encoder_hidden_states=hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": expected_ids.expand(2, -1)}).sample
    torch.testing.assert_close(family.predict(pipe.unet, noisy, t, cond), expected)


def images(n=2, size=16):
    return list((torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8))


def test_the_rows_time_ids_record_the_crop_taken_as_diffusers_sdxl_scripts(sdxl):
    """A 42 x 20 image at 16 px: resized to 33 x 16 (int(16 x 42 / 20) = 33), so a centre crop starts at left
    round(8.5) = 8; a random crop's offset is the one cut; a mirrored row is mirrored before the crop
    (train_text_to_image_lora_sdxl.py) and records the crop in the mirrored image: columns 9..24 of the original."""
    ramp = Image.fromarray((np.arange(42 * 20 * 3) % 251).astype(np.uint8).reshape(20, 42, 3))
    resized = np.asarray(ramp.resize((33, 16), Image.LANCZOS))
    for center in (True, False):
        family = StableDiffusionXL(sdxl[0], "cpu", random_flip=True, center_crop=center)
        family.encode_pixels = lambda pixels: pixels  # the cropped pixels themselves
        batch = StableDiffusionXL.collate([
            {k: v[0] for k, v in family.transform("image", "text", 16)({"image": [ramp], "text": ["x"]}).items()}])
        assert batch["pixel_values"][0].shape == (3, 16, 33) and batch["original_size"].tolist() == [[20, 42]]
        seen = set()
        for seed in range(12):
            mirrored = bool(family.flips(1, torch.Generator().manual_seed(seed))[0])  # the rows' first draw
            rows = family.rows(batch, torch.Generator().manual_seed(seed))
            left = rows.cond["time_ids"][0, 3].item()
            assert rows.cond["time_ids"][0].tolist() == [20, 42, 0, left, 16, 16]
            assert left == 8 if center else 0 <= left <= 17
            expected = (resized[:, ::-1] if mirrored else resized)[:, left:left + 16]
            np.testing.assert_array_equal(rows.x[0].permute(1, 2, 0).numpy(),
                                          (expected.astype(np.float32) / 255 - 0.5) / 0.5)
            seen.add((mirrored, left))
        assert {m for m, _ in seen} == {False, True}
        lefts = {left for _, left in seen}
        assert len(lefts) == 1 if center else len(lefts) >= 4


def test_dropped_captions_and_bank_rows_take_the_empty_prompt_and_keep_their_sizes(sdxl):
    _, family = sdxl
    rows = family.rows({"pixel_values": images(), "input_ids": family.tokenize(PROMPTS),
                        "original_size": torch.tensor([[20, 40]] * 2)}, None)
    dropped = family.drop_condition(rows, torch.tensor([True, False]))
    assert torch.equal(dropped.cond["input_ids"][0], family.empty_ids[0])
    assert torch.equal(dropped.cond["input_ids"][1], rows.cond["input_ids"][1])
    assert torch.equal(dropped.cond["time_ids"], rows.cond["time_ids"])
    bank = family.bank_rows({"latent_moments": torch.zeros(3, 8, 8, 8)}, None)
    assert torch.equal(bank.cond["input_ids"], family.empty_ids.expand(3, -1, -1))
    assert bank.cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 3


def test_the_diff_tuning_core_trains_the_sdxl_unet(sdxl):
    """Bank rows first (empty prompt, square ids), data rows after; a finite loss whose gradient reaches the UNet."""
    pipe, family = sdxl
    core = DiffTuning(DDPMScheduler.from_config(pipe.scheduler.config), retention_ratio=0.5, batch_size=4,
                      condition_dropout=0.1)
    data = {"pixel_values": images(), "input_ids": family.tokenize(PROMPTS),
            "original_size": torch.tensor([[20, 40]] * 2)}
    bank = {"latent_moments": torch.randn(2, 8, 8, 8), "input_ids": family.tokenize(PROMPTS)}
    unet = pipe.unet.train().requires_grad_(True)
    loss, parts = core(family, unet, data, bank, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"loss_adapt", "loss_retain"}
    assert all(p.grad is not None for p in unet.add_embedding.parameters())  # the pooled + time ids path trains
    unet.zero_grad(set_to_none=True)
    unet.requires_grad_(False)


def test_fixed_crop_coordinates_replace_each_images_own(sdxl):
    """--crops_coords_top_left_h/w: every row records the given crop, flipped or not."""
    pipe, _ = sdxl
    family = StableDiffusionXL(pipe, "cpu", random_flip=True, crops_coords_top_left=(3, 5))
    batch = family.transform("image", "text", 16)({"image": [Image.new("RGB", (40, 20))] * 2, "text": PROMPTS})
    collated = family.collate([{k: v[i] for k, v in batch.items()} for i in range(2)])
    rows = family.rows(collated, torch.Generator().manual_seed(0))
    assert rows.cond["time_ids"].tolist() == [[20, 40, 3, 5, 16, 16]] * 2


def test_a_vae_that_asks_for_upcast_stays_fp32_under_mixed_precision(tiny_sdxl_dir):
    """The stock SDXL VAE (force_upcast) is kept in fp32 and encodes with autocast off; a fixed VAE (no
    force_upcast, as madebyollin/sdxl-vae-fp16-fix) takes the mixed-precision dtype; pipelines carry no watermark."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert pipe.vae.config.force_upcast
    family = StableDiffusionXL(pipe, "cpu", dtype=torch.bfloat16)
    assert family.vae.dtype == torch.float32 and family.text_encoder.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = family.rows({"pixel_values": images(), "input_ids": family.tokenize(PROMPTS),
                            "original_size": torch.tensor([[16, 16]] * 2)}, None)
    assert rows.x.dtype == torch.float32
    fixed = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    fixed.vae.register_to_config(force_upcast=False)
    assert StableDiffusionXL(fixed, "cpu", dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    assert family.inference_pipeline(pipe.unet, family.text_encoders, pipe.scheduler).watermark is None
