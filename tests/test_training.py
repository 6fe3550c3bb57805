"""The shared training conventions (utils.infra.training) that every script's flags reach."""

import pytest
import torch

import train_diff_tuning_dit as script
from utils.infra.errors import UserError
from utils.infra.training import lr_schedule


def args_of(*flags):
    return script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset", "y", "--max_train_steps", "100",
                              *flags])


def lrs(args, steps=100):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(optimizer, args, num_processes=1)
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
