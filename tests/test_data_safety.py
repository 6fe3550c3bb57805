"""No input may delete or overwrite what a script did not write, a diverged run stops in one line with nothing
non-finite saved, carded or pushed, and a kill loses at most the steps since the last checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

import evaluate_fid as evaluate
import merge_timestep_models as merge_script
import train_deme
import train_diff_tuning_dit as dit_script
from fixtures.small_dit import build_pipeline
from fixtures.testing import ROOT, TEST_EXTRACTOR, TINY_ARGS, run_main
from utils.infra import hub, outputs, training
from utils.infra.errors import UserError
from utils.methods.memory_bank import check_bank_dir

DEME_TINY = ["--train_batch_size", "8", "--validation_steps", "0", "--num_validation_images", "2",
             "--validation_inference_steps", "2", "--report_to", "none", "--num_ranges", "2"]


def snapshot(folder):
    """Every file under `folder` with its bytes: what must survive a refused run unchanged."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def copies(tiny_ddpm_dir, tmp_path_factory):
    """A train_deme.py-like output folder: a manifest and two perturbed range models."""
    root = tmp_path_factory.mktemp("deme_out") / "deme"
    ranges = []
    for i in range(2):
        unet = UNet2DModel.from_pretrained(tiny_ddpm_dir, subfolder="unet")
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * (i + 1))
        unet.save_pretrained(root / f"range_{i}")
        ranges.append({"index": i, "timesteps": [500 * i, 500 * (i + 1)], "folder": f"range_{i}"})
    (root / "deme_manifest.json").write_text(json.dumps({"ranges": ranges}))
    outputs.mark(str(root), "train_deme.py")
    return root


# ---- merge_timestep_models.py: --output_dir never deletes inputs or the user's files.

@pytest.mark.parametrize("target", ["the_models_folder", "its_parent", "a_range_model", "the_base_model",
                                    "inside_a_range_model", "a_user_folder", "a_file"])
def test_merge_refuses_an_output_it_did_not_write(target, tiny_ddpm_dir, copies, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("months of work")
    (tmp_path / "notes.txt").write_text("keep me")
    out = {"the_models_folder": copies, "its_parent": copies.parent, "a_range_model": copies / "range_0",
           "the_base_model": tiny_ddpm_dir, "inside_a_range_model": copies / "range_1" / "merged",
           "a_user_folder": user, "a_file": tmp_path / "notes.txt"}[target]
    before = {p: snapshot(p) for p in (copies, tiny_ddpm_dir, user)}
    with pytest.raises(UserError, match="overlaps|did not write|is a file"):
        merge_script.parse_args(["--base_model", tiny_ddpm_dir, "--models", str(copies), "--output_dir", str(out)])
    assert {p: snapshot(p) for p in before} == before
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.cli
def test_merge_with_dot_as_output_refuses_the_current_folder(tiny_ddpm_dir, copies, tmp_path, monkeypatch):
    (tmp_path / "work.py").write_text("print('mine')")
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "merge_timestep_models.py"), "--base_model",
                           tiny_ddpm_dir, "--models", str(copies), "--output_dir", "."],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --output_dir . ")
    assert sorted(os.listdir(tmp_path)) == ["work.py"]


def test_merge_replaces_only_its_own_earlier_output(tiny_ddpm_dir, copies, tmp_path):
    out = tmp_path / "merged"
    for weights in (["0.5", "0.5"], ["1", "0"]):
        merge_script.main(merge_script.parse_args(["--base_model", tiny_ddpm_dir, "--models", str(copies),
                                                   "--weights", *weights, "--output_dir", str(out)]))
    merged = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    range_0 = load_file(copies / "range_0" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(merged[k], range_0[k]) for k in range_0)  # the second merge replaced the first
    assert outputs.created_by(str(out)) == "merge_timestep_models.py"
    assert [n for n in os.listdir(tmp_path) if n != "merged"] == []  # no temporary folders left behind


def test_merge_of_broken_models_saves_nothing(tiny_ddpm_dir, copies, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(copies / "range_0", broken)
    weights = load_file(broken / "diffusion_pytorch_model.safetensors")
    weights[next(iter(weights))].fill_(float("nan"))
    save_file(weights, broken / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="NaN or infinite"):
        merge_script.main(merge_script.parse_args(["--base_model", tiny_ddpm_dir, "--models", str(broken),
                                                   str(copies / "range_1"), "--output_dir", str(tmp_path / "out")]))
    assert sorted(os.listdir(tmp_path)) == ["broken"]


# ---- Training scripts: the output folder must be new, empty or their own; never an input.

@pytest.mark.parametrize("script", [dit_script, train_deme])
def test_training_refuses_an_output_folder_it_did_not_write(script, tiny_pipeline_dir, digits_dir, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "checkpoint-100").mkdir()  # e.g. another trainer's run, which rotation would otherwise delete
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir]
    with pytest.raises(UserError, match="did not write"):
        script.parse_args([*argv, "--output_dir", str(user)])
    with pytest.raises(UserError, match="overlaps --dataset"):
        script.parse_args([*argv, "--output_dir", os.path.join(digits_dir, "out")])
    with pytest.raises(UserError, match="overlaps --pretrained_model_name_or_path"):
        script.parse_args([*argv, "--output_dir", tiny_pipeline_dir])
    outputs.mark(str(tmp_path / "deme_out"), "train_deme.py")
    if script is dit_script:
        with pytest.raises(UserError, match="is an output of train_deme.py"):
            script.parse_args([*argv, "--output_dir", str(tmp_path / "deme_out")])
    assert os.listdir(user) == ["checkpoint-100"]


def test_a_folder_that_is_not_a_bank_is_refused_before_generation(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(UserError, match="exists but is not a memory bank"):
        check_bank_dir(str(tmp_path / "photos"))
    (tmp_path / "bank.partial").mkdir()  # the user's own folder that happens to have the shard folder's name
    with pytest.raises(UserError, match="was not written by a memory-bank generation"):
        check_bank_dir(str(tmp_path / "bank"))
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]


# ---- Divergence: one line naming the step; the last checkpoint stays; nothing non-finite is saved.

def test_dit_divergence_stops_with_one_line_and_saves_nothing(tiny_pipeline_dir, digits_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"is not finite at step \d+: training diverged") as err:
        run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *TINY_ARGS, "--method", "standard",
                 "--learning_rate", "1e6", "--max_train_steps", "30", "--checkpointing_steps", "1")
    assert not {"model_index.json", "README.md", "samples.png", "transformer"} & set(os.listdir(out))
    checkpoints = sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")), key=lambda d: int(d[11:]))
    assert checkpoints and f"the latest good state is {out / checkpoints[-1]}" in str(err.value)
    for name in checkpoints:  # every checkpoint written holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(out / name / "model.safetensors").values())


@pytest.mark.cli
def test_divergence_message_is_the_last_line_of_a_real_run(tiny_pipeline_dir, digits_dir, tmp_path):
    proc = subprocess.run([sys.executable, "train_diff_tuning_dit.py", "--pretrained_model_name_or_path",
                           tiny_pipeline_dir, "--dataset", digits_dir, "--output_dir", str(tmp_path / "out"),
                           *TINY_ARGS, "--method", "standard", "--learning_rate", "1e6", "--max_train_steps", "30"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "not finite at step" in last and "no checkpoint was written" in last


def test_deme_divergence_stops_and_saves_no_range(tiny_ddpm_dir, digits_dir, tmp_path):
    with pytest.raises(UserError, match="not finite at step"):
        run_main(train_deme, tiny_ddpm_dir, digits_dir, tmp_path / "out", *DEME_TINY, "--range_index", "0",
                 "--learning_rate", "1e6", "--max_train_steps", "30", "--max_grad_norm", "0")
    assert not (tmp_path / "out" / "range_0" / "README.md").exists()
    assert not (tmp_path / "out" / "range_0" / "diffusion_pytorch_model.safetensors").exists()


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    from accelerate import Accelerator

    model = torch.nn.Linear(2, 2)
    accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="a weight or buffer of the model is not finite at step 7"):
        training.check_finite_weights(accelerator, model, 7, str(tmp_path))
    # finite parameters, NaN running statistics (Bi-tuning at lr 1e6 saved such a ResNet before)
    norm = torch.nn.BatchNorm2d(3)
    training.check_finite_weights(accelerator, norm, 7, str(tmp_path))
    norm.running_var[1] = float("nan")
    assert all(torch.isfinite(p).all() for p in norm.parameters())
    with pytest.raises(UserError, match="not finite at step 7"):
        training.check_finite_weights(accelerator, norm, 7, str(tmp_path))


def test_a_nonfinite_model_is_never_pushed(tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr(hub, "create_repo", lambda *a, **kw: sent.append(a))
    monkeypatch.setattr(hub, "upload_folder", lambda *a, **kw: sent.append(kw))
    save_file({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="NaN or infinite"):
        hub.push_folder(str(tmp_path), "me/model", "token")
    assert sent == []
    # A NaN inside a checkpoint (never uploaded) does not block the push of a finite model.
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    os.makedirs(tmp_path / "checkpoint-1")
    save_file({"w": torch.tensor([float("nan")])}, tmp_path / "checkpoint-1" / "model.safetensors")
    monkeypatch.setattr(hub, "create_repo", lambda *a, **kw: type("R", (), {"repo_id": a[0]}))
    hub.push_folder(str(tmp_path), "me/model", "token")
    assert sent and ".created_by.json" in hub.UPLOAD_IGNORE


# ---- evaluate_fid.py: a non-finite FID is an error; the report is strict JSON, checked before any sampling.

def test_evaluate_refuses_a_nonfinite_fid(tiny_pipeline_dir, digits_dir, tmp_path, monkeypatch):
    """Finite weights whose samples are not finite (a model diverged in a way the weights do not show): the FID is
    NaN, which is an error, and no report is written. (NaN weights are refused before sampling: test_evaluate.)"""
    report = tmp_path / "fid.json"

    def nan_samples(pipe, num_samples, batch_size, *a, **kw):
        yield torch.full((num_samples, 3, 8, 8), float("nan"))

    monkeypatch.setattr(evaluate, "generate", nan_samples)
    with pytest.raises(UserError, match="FID is nan at k = 0%"):
        evaluate.main(evaluate.parse_args(["--model", tiny_pipeline_dir, "--dataset", digits_dir, "--num_samples",
                                           "4", "--batch_size", "4", "--num_inference_steps", "2",
                                           "--feature_extractor", TEST_EXTRACTOR, "--output_file", str(report),
                                           "--reference_cache_dir", ""]))
    assert not report.exists()


@pytest.mark.parametrize("case", ["missing_folder", "not_a_report", "a_folder"])
def test_evaluate_checks_its_report_path_before_sampling(case, tiny_pipeline_dir, digits_dir, tmp_path):
    (tmp_path / "train.py").write_text("code")
    path = {"missing_folder": tmp_path / "no" / "fid.json", "not_a_report": tmp_path / "train.py",
            "a_folder": tmp_path}[case]
    with pytest.raises(UserError, match="does not exist|not written by this script|is a folder"):
        evaluate.parse_args(["--model", tiny_pipeline_dir, "--dataset", digits_dir, "--output_file", str(path)])
    assert (tmp_path / "train.py").read_text() == "code"


def test_strict_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        outputs.write_json_atomically(str(tmp_path / "r.json"), {"fid": float("nan")})
    assert os.listdir(tmp_path) == []


# ---- A kill during a checkpoint save keeps the previous checkpoint (rotation happens after the save).

def test_a_kill_during_the_save_keeps_the_previous_checkpoint(tiny_pipeline_dir, digits_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state
    calls = []

    def killed_on_second_save(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            real_save_state(self, path, *a, **kw)  # half-way: the files are written, the rename never happens
            raise KeyboardInterrupt
        return real_save_state(self, path, *a, **kw)

    monkeypatch.setattr(Accelerator, "save_state", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_main(dit_script, tiny_pipeline_dir, digits_dir, tmp_path, *TINY_ARGS, "--method", "standard",
                 "--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    assert sorted(os.listdir(tmp_path)) == [".created_by.json", "checkpoint-1", "checkpoint-2.tmp"]


# ---- Resume: a checkpoint of another model, or a corrupt one, is refused in one line.

def test_resume_refuses_a_checkpoint_of_another_model_or_a_corrupt_one(tiny_pipeline_dir, digits_dir, tmp_path):
    out = tmp_path / "out"
    common = [*TINY_ARGS, "--method", "standard", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]
    run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *common, "--max_train_steps", "2")
    recorded = json.loads((out / "checkpoint-2" / "training_run.json").read_text())
    assert recorded["pretrained_model_name_or_path"] == tiny_pipeline_dir and recorded["method"] == "standard"
    other = tmp_path / "other_dit"  # the same architecture, other weights: shapes alone would not tell them apart
    build_pipeline(seed=1).save_pretrained(other)
    with pytest.raises(UserError, match="was made with --pretrained_model_name_or_path .* this run has"):
        run_main(dit_script, str(other), digits_dir, out, *common, "--max_train_steps", "4")
    with pytest.raises(UserError, match="was made with --tuning 'full', this run has 'bitfit'"):
        run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *common, "--max_train_steps", "4",
                 "--tuning", "bitfit")
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(UserError, match="cannot resume from .*checkpoint-2: it is corrupt or incomplete"):
        run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *common, "--max_train_steps", "4")


def test_a_rerun_into_a_finished_output_is_refused_unless_asked(tiny_pipeline_dir, digits_dir, tmp_path):
    """A second run into a finished output folder would restart at step 0 and replace the earlier results: one line,
    unless --resume_from_checkpoint or --overwrite_output_dir says that is meant."""
    out = tmp_path / "out"
    run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *TINY_ARGS, "--method", "standard", "--max_train_steps",
             "2", "--checkpointing_steps", "2")
    card = (out / "README.md").read_text()
    with pytest.raises(UserError, match="holds a finished run; pass --resume_from_checkpoint latest"):
        run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *TINY_ARGS, "--method", "standard",
                 "--max_train_steps", "2")
    assert (out / "README.md").read_text() == card
    run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *TINY_ARGS, "--method", "standard", "--max_train_steps",
             "2", "--resume_from_checkpoint", "latest")
    run_main(dit_script, tiny_pipeline_dir, digits_dir, out, *TINY_ARGS, "--method", "standard", "--max_train_steps",
             "3", "--overwrite_output_dir")

