"""The shared training conventions (utils.infra.training) that every script's flags reach."""

import pytest
import torch

import train_diff_tuning_dit as script
from utils.infra.errors import UserError
from utils.infra.training import lr_schedule, run_length


def args_of(*flags):
    return script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--max_train_steps", "100",
                              *flags])


def lrs(args, steps=100):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(optimizer, args, num_processes=1, max_train_steps=args.max_train_steps)
    values = []
    for _ in range(steps):
        values.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return values


def test_lr_num_cycles_and_lr_power_reach_diffusers_schedules():
    one, two = (lrs(args_of("--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", n)) for n in ("1", "2"))
    assert one[50] == pytest.approx(0.5, abs=0.02) and two[50] == pytest.approx(1.0, abs=0.01)  # a restart at 50
    linear, square = (lrs(args_of("--lr_scheduler", "polynomial", "--lr_power", p)) for p in ("1", "2"))
    assert linear[50] == pytest.approx(0.5, abs=0.02) and square[50] == pytest.approx(0.25, abs=0.02)
    with pytest.raises(UserError, match="--lr_num_cycles must be >= 1"):
        args_of("--lr_num_cycles", "0")


def test_help_never_prints_a_default_twice():
    """A flag whose help already says its (computed) default gets no second "(default: None)"."""
    import re

    import evaluate_fid
    import generate_memory_bank
    import merge_timestep_models
    import train_bi_tuning
    import train_deme
    import train_diff_tuning_controlnet
    import train_diff_tuning_text_to_image
    from fixtures.testing import cli_help

    for module in (script, train_diff_tuning_controlnet, train_deme, train_bi_tuning, train_diff_tuning_text_to_image,
                   merge_timestep_models, evaluate_fid, generate_memory_bank):
        text = " ".join(cli_help(module).split())
        entries = re.split(r" (?=-{1,2}[a-z])", text)
        assert not [e for e in entries if e.count("(default:") > 1], module.__name__


def test_run_length_counts_epochs_as_diffusers_examples():
    """--num_train_epochs: batches split over the processes (rounded up), then grouped by the accumulation (rounded
    up); --checkpointing_steps epoch: one pass; --max_train_steps alone: unchanged."""
    def length(*flags, batches=10, processes=2):
        return run_length(script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", *flags]),
                          batches, processes)

    assert length("--num_train_epochs", "2", "--gradient_accumulation_steps", "2") == (6, 2000, 3)  # 5 -> 3 a pass
    assert length("--num_train_epochs", "3", "--checkpointing_steps", "epoch", processes=1) == (30, 10, 10)
    assert length("--max_train_steps", "7", "--checkpointing_steps", "epoch", batches=3) == (7, 2, 2)
    assert length("--num_train_epochs", "1", batches=1, processes=4).max_train_steps == 1
    with pytest.raises(SystemExit):  # argparse: "not allowed with argument --max_train_steps"
        args_of("--num_train_epochs", "1")
    with pytest.raises(SystemExit):
        args_of("--checkpointing_steps", "often")
    with pytest.raises(UserError, match="--num_train_epochs must be >= 1"):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--num_train_epochs", "0"])


def test_processes_that_accelerate_did_not_join_are_refused(tiny_pipeline_dir, digits_dir, tmp_path, monkeypatch):
    """An FSDP config with use_cpu: accelerate launch starts 2 processes that each set up a world of 1 (FSDP is
    GPU-only in accelerate 1.x); they would overwrite each other's outputs, so the first line refuses them."""
    from fixtures.testing import cli_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    message = cli_error(script, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--dataset", digits_dir,
                                 "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert "2 processes were launched but accelerate set up 1" in message and "FSDP and DeepSpeed need GPUs" in message
    assert not (tmp_path / "out").exists()
