import json
import os

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import merge_timestep_models as script
from fixtures.small_unet import build_ddpm_pipeline
from fixtures.testing import ROOT, TEST_EXTRACTOR, cli_error
from utils.infra.errors import UserError
from utils.methods.merging import SafetensorsWeights, merge_tensors
from utils.methods.timestep_ensemble import TimestepEnsemble

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def three_copies(tiny_ddpm_dir, tmp_path_factory):
    """Three perturbed copies of the tiny DDPM UNet, each saved as a stock model folder."""
    root = tmp_path_factory.mktemp("copies")
    folders = []
    for i in range(3):
        unet = UNet2DModel.from_pretrained(tiny_ddpm_dir, subfolder="unet")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        unet.save_pretrained(root / f"m{i}")
        folders.append(str(root / f"m{i}"))
    return folders


def merge(*argv):
    return script.main(script.parse_args(list(argv)))


def test_task_arithmetic_equals_an_independent_computation(tiny_ddpm_dir, three_copies, tmp_path):
    w = [0.2, -0.5, 1.3]
    merge("--base_model", tiny_ddpm_dir, "--models", *three_copies, "--weights", *map(str, w),
          "--output_dir", str(tmp_path / "out"))
    base = load_file(os.path.join(tiny_ddpm_dir, "unet", WEIGHTS))
    thetas = [load_file(os.path.join(f, WEIGHTS)) for f in three_copies]
    merged = load_file(tmp_path / "out" / "unet" / WEIGHTS)
    assert set(merged) == set(base)
    for k in base:
        expected = base[k].double() + sum(wi * (t[k].double() - base[k].double()) for wi, t in zip(w, thetas))
        assert torch.allclose(merged[k].double(), expected, atol=1e-6), k
    # A full stock pipeline: the base's scheduler beside the merged UNet.
    DDPMPipeline.from_pretrained(tmp_path / "out")(num_inference_steps=2, output_type="np")


def test_zero_weights_give_back_the_base_bit_for_bit(tiny_ddpm_dir, three_copies, tmp_path):
    merge("--base_model", tiny_ddpm_dir, "--models", *three_copies, "--weights", "0", "0", "0",
          "--output_dir", str(tmp_path / "out"))
    base = load_file(os.path.join(tiny_ddpm_dir, "unet", WEIGHTS))
    merged = load_file(tmp_path / "out" / "unet" / WEIGHTS)
    assert all(base[k].dtype == merged[k].dtype and torch.equal(base[k].view(torch.int32), merged[k].view(torch.int32))
               for k in base)


def test_integer_buffers_are_copied_and_ties_dare_run(tmp_path):
    base = {"w": torch.randn(64), "steps": torch.tensor([7], dtype=torch.int64)}
    models = [{"w": base["w"] + torch.randn(64), "steps": torch.tensor([100 + i])} for i in range(2)]

    class Dict:
        def __init__(self, d):
            self.d, self.meta = d, {k: (tuple(v.shape), str(v.dtype)) for k, v in d.items()}

        def keys(self):
            return list(self.d)

        def get(self, k):
            return self.d[k]

    results = {}
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        out = merge_tensors(Dict(base), [Dict(m) for m in models], [0.5, 0.5], method, density=0.5, seed=0)
        assert torch.equal(out["steps"], base["steps"])
        results[method] = out["w"]
    assert not torch.allclose(results["ties"], results["task_arithmetic"])
    # TIES keeps the top half of each task vector by magnitude: at most 64 changed entries, fewer than all.
    assert 0 < (results["ties"] != base["w"]).sum() < 64
    again = merge_tensors(Dict(base), [Dict(m) for m in models], [0.5, 0.5], "dare_linear", density=0.5, seed=0)
    assert torch.equal(again["w"], results["dare_linear"])  # DARE's pruning is seeded


def test_ensemble_uses_model_i_exactly_on_range_i(tiny_ddpm_dir, three_copies, tmp_path):
    merge("--base_model", tiny_ddpm_dir, "--models", *three_copies, "--ensemble", "--output_dir", str(tmp_path / "e"))
    ensemble = TimestepEnsemble.from_pretrained(str(tmp_path / "e"))
    assert ensemble.ranges == [(0, 333), (333, 666), (666, 1000)]
    models = [UNet2DModel.from_pretrained(f) for f in three_copies]
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 332, 333, 665, 666, 999])
    with torch.no_grad():
        mixed = ensemble(x, t).sample
        for row, ti in enumerate(t.tolist()):
            i = [k for k, (lo, hi) in enumerate(ensemble.ranges) if lo <= ti < hi][0]
            alone = models[i](x[row : row + 1], torch.tensor([ti])).sample
            assert torch.allclose(mixed[row : row + 1], alone, atol=1e-5)
            for j in set(range(3)) - {i}:
                assert not torch.allclose(mixed[row : row + 1], models[j](x[row : row + 1], torch.tensor([ti])).sample)
        assert torch.equal(ensemble(x[:2], 500).sample, models[1](x[:2], 500).sample)  # a pipeline's scalar t
    # The documented one-liner samples.
    pipe = DDIMPipeline(unet=ensemble, scheduler=DDIMScheduler.from_pretrained(tiny_ddpm_dir, subfolder="scheduler"))
    assert pipe(num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 3)
    assert "timestep-ensemble" in ModelCard.load(tmp_path / "e" / "README.md").data.tags


def test_grid_search_keeps_the_best_and_records_the_table(tiny_ddpm_dir, three_copies, digits_dir, tmp_path):
    weights, table = merge("--base_model", tiny_ddpm_dir, "--models", *three_copies[:2], "--search", "grid",
                           "--grid_values", "0", "1", "--validation_dataset", digits_dir, "--validation_batches", "1",
                           "--validation_batch_size", "8", "--output_dir", str(tmp_path / "out"))
    assert len(table) == 4 and {tuple(r["weights"]) for r in table} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert weights == table[0]["weights"] and table[0]["mean_loss"] == min(r["mean_loss"] for r in table)
    assert all(len(r["range_losses"]) == 2 for r in table)
    assert json.loads((tmp_path / "out" / "search_results.json").read_text()) == table
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "held-out loss, weights" in card.content and "grid" in card.content
    # What was saved is the merge with the winning weights.
    again = tmp_path / "again"
    merge("--base_model", tiny_ddpm_dir, "--models", *three_copies[:2], "--weights", *map(str, weights),
          "--output_dir", str(again))
    a, b = load_file(tmp_path / "out" / "unet" / WEIGHTS), load_file(again / "unet" / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fid_search_scores_what_evaluate_measures(tiny_ddpm_dir, three_copies, digits_dir, tmp_path):
    import evaluate_fid as evaluate

    weights, table = merge("--base_model", tiny_ddpm_dir, "--models", *three_copies[:2], "--search", "coordinate",
                           "--search_rounds", "1", "--grid_values", "0", "1", "--search_metric", "fid",
                           "--feature_extractor", TEST_EXTRACTOR, "--fid_samples", "8", "--fid_inference_steps", "3",
                           "--validation_dataset", digits_dir, "--validation_batch_size", "8",
                           "--reference_cache_dir", "", "--output_dir", str(tmp_path / "out"))
    assert weights == table[0]["weights"] and table[0]["fid"] == min(r["fid"] for r in table)
    assert len({r["fid"] for r in table}) == len(table) >= 3  # weights change the samples
    report = evaluate.main(evaluate.parse_args([
        "--model", str(tmp_path / "out"), "--dataset", digits_dir, "--feature_extractor", TEST_EXTRACTOR,
        "--num_samples", "8", "--batch_size", "8", "--num_inference_steps", "3", "--reference_cache_dir", "",
        "--output_file", str(tmp_path / "fid.json")]))
    assert report["results"][0]["fid"] == pytest.approx(table[0]["fid"], rel=1e-5)
    assert "FID, weights" in ModelCard.load(tmp_path / "out" / "README.md").content


def test_merge_memory_does_not_hold_all_models(three_copies, tiny_ddpm_dir):
    """The lazy reader keeps only shapes in memory; tensors are read one at a time."""
    reader = SafetensorsWeights(three_copies[0])
    assert set(reader.meta) == set(load_file(os.path.join(three_copies[0], WEIGHTS)))
    assert not any(torch.is_tensor(v) for v in vars(reader).values())


@pytest.mark.parametrize("case,message", [
    ("weight_count", "--weights has 2 values for 3 models"),
    ("missing_folder", "model folder .* does not exist"),
    ("missing_weights", "has no diffusion_pytorch_model.safetensors"),
    ("other_architecture", "does not match the base model: tensor .* (is missing|has shape)"),
    ("search_without_data", "--search needs --validation_dataset"),
])
def test_bad_input_is_one_line(case, message, tiny_ddpm_dir, three_copies, tmp_path):
    models, extra = list(three_copies), []
    if case == "weight_count":
        extra = ["--weights", "0.5", "0.5"]
    elif case == "missing_folder":
        models[1] = str(tmp_path / "nope")
    elif case == "missing_weights":
        (tmp_path / "empty").mkdir()
        models[1] = str(tmp_path / "empty")
    elif case == "other_architecture":
        build_ddpm_pipeline(channels=(8, 24)).unet.save_pretrained(tmp_path / "other")
        models[2] = str(tmp_path / "other")
    elif case == "search_without_data":
        extra = ["--search", "grid"]
    last = cli_error(script, ["--base_model", tiny_ddpm_dir, "--models", *models, "--output_dir",
                              str(tmp_path / "out"), *extra])
    assert __import__("re").search(message, last), last
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_parse_args_rejects_weight_count():
    with pytest.raises(UserError, match="one weight per model"):
        script.parse_args(["--base_model", "b", "--models", ROOT, ROOT, "--weights", "1", "--output_dir", "o"])


def test_streamed_merge_file_reads_back_exactly(tmp_path):
    """save_merged writes the safetensors file tensor by tensor; it must read back as save_file's would."""
    from safetensors.torch import save_file

    from utils.methods.merging import save_merged

    g = torch.Generator().manual_seed(0)
    tensors = {"conv.weight": torch.randn(3, 4, 3, 3, generator=g), "steps": torch.arange(5),
               "norm.bf16": torch.randn(6, generator=g).bfloat16(), "emb.half": torch.randn(2, 7, generator=g).half(),
               "flag": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "reference.safetensors")
    meta = SafetensorsWeights(str(tmp_path / "reference.safetensors")).meta
    save_merged(str(tmp_path / "streamed.safetensors"), meta, ((k, tensors[k]) for k in meta))
    loaded = load_file(tmp_path / "streamed.safetensors")
    assert set(loaded) == set(tensors)
    assert all(loaded[k].dtype == tensors[k].dtype and torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="does not match the header"):
        save_merged(str(tmp_path / "bad.safetensors"), meta, ((k, tensors[k][:1]) for k in meta))


@pytest.fixture(scope="module")
def projected_copies(tiny_ddpm_dir, tmp_path_factory):
    """Two range models saved as train_deme.py --channel_projection official saves them (maps beside the stock
    weights), with maps far from the identity, and the models as they compute with their maps."""
    from utils.methods import channel_projection as cp

    root, folders, live = tmp_path_factory.mktemp("projected"), [], []
    for i in range(2):
        unet = UNet2DModel.from_pretrained(tiny_ddpm_dir, subfolder="unet")
        cp.add_projections(unet, "official")
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                block.channel_projection.projection.add_(0.3 * torch.randn(block.channel_projection.projection.shape,
                                                                           generator=g))
        cp.save_unet(unet, root / f"r{i}")
        assert (root / f"r{i}" / cp.PROJECTION_FILE).exists()
        folders.append(str(root / f"r{i}"))
        live.append(unet.eval())
    return folders, live


def test_official_projections_are_attached_wherever_a_model_is_loaded_for_sampling(tiny_ddpm_dir, projected_copies,
                                                                                   tmp_path):
    """Sampling an official-placement model without its maps computes another model: the ensemble export, the
    ensemble loader and evaluate_fid.py's loader must all put them back."""
    import shutil

    import evaluate_fid

    folders, live = projected_copies
    size = live[0].config.sample_size
    x, t = torch.randn(2, live[0].config.in_channels, size, size), torch.tensor([900, 900])
    stock = UNet2DModel.from_pretrained(folders[1])
    with torch.no_grad():
        assert not torch.allclose(stock(x, t).sample, live[1](x, t).sample, atol=1e-3)  # the maps matter
        merge("--base_model", tiny_ddpm_dir, "--models", *folders, "--ensemble", "--output_dir", str(tmp_path / "e"))
        ensemble = TimestepEnsemble.from_pretrained(str(tmp_path / "e"))
        torch.testing.assert_close(ensemble(x, t).sample, live[1](x, t).sample)
        torch.testing.assert_close(ensemble(x, t - 800).sample, live[0](x, t - 800).sample)

        pipeline = tmp_path / "pipeline"  # a pipeline whose UNet carries maps, as a merge of such models writes it
        shutil.copytree(tiny_ddpm_dir, pipeline)
        shutil.rmtree(pipeline / "unet")
        shutil.copytree(folders[1], pipeline / "unet")
        kind, unet, _ = evaluate_fid.load_denoiser(str(pipeline))
        torch.testing.assert_close(unet(x, t).sample, live[1](x, t).sample)


def test_search_over_official_projection_models_scores_each_candidate_with_its_merged_maps(
        tiny_ddpm_dir, projected_copies, digits_dir, tmp_path):
    """The score of the chosen weights is the held-out loss of the model as saved and loaded back with its maps."""
    from diffusers import DDPMPipeline

    from utils.families.ddpm import DDPMUNet
    from utils.methods.channel_projection import attach_saved_projections
    from utils.methods.deme import range_losses

    folders, _ = projected_copies
    weights, table = merge("--base_model", tiny_ddpm_dir, "--models", *folders, "--search", "grid",
                           "--grid_values", "0", "1", "--validation_dataset", digits_dir, "--validation_batches", "1",
                           "--validation_batch_size", "8", "--output_dir", str(tmp_path / "out"))
    assert len({r["mean_loss"] for r in table}) == 4  # the maps (and weights) change every candidate's loss
    pipeline = DDPMPipeline.from_pretrained(tiny_ddpm_dir)
    family = DDPMUNet(pipeline, "cpu")
    batches = script.validation_batches(script.parse_args([
        "--base_model", tiny_ddpm_dir, "--models", *folders, "--output_dir", str(tmp_path / "x"),
        "--validation_dataset", digits_dir, "--validation_batches", "1", "--validation_batch_size", "8"]),
        family)
    saved = attach_saved_projections(UNet2DModel.from_pretrained(tmp_path / "out" / "unet"), tmp_path / "out" / "unet")
    with torch.no_grad():
        losses = range_losses(family, saved.eval(), batches, [(0, 500), (500, 1000)], 0)
    assert weights == table[0]["weights"]
    assert losses == pytest.approx(table[0]["range_losses"], rel=1e-5)
