"""Parsing a script's flags: which option string the user typed for each destination (so a message names
`--prior_loss_weight`, not the `--retention_weight` it aliases), and the check every entry point shares that each
float flag is a finite number (argparse's `float` takes "nan" and "inf", which pass every `<` and `>` check)."""

import argparse
import math
import sys

from .errors import UserError

GIVEN = "flags_given"  # the namespace entry parse_flags adds: destination -> the option string typed


def parse_flags(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`p.parse_args(argv)`, plus which of each flag's option strings the command line used (`flag_of`)."""
    args = p.parse_args(argv)
    tokens = sys.argv[1:] if argv is None else [str(t) for t in argv]
    given = {}
    for action in p._actions:
        for option in action.option_strings:
            if any(t == option or t.startswith(option + "=") for t in tokens):
                given[action.dest] = option
    setattr(args, GIVEN, given)
    return args


def flag_of(args, dest: str) -> str:
    """The flag as the user typed it (an alias where one was used), else `--dest`."""
    return getattr(args, GIVEN, {}).get(dest, f"--{dest}")


def check_finite_flags(args) -> None:
    """Every float flag (and every float in a list flag) is finite, before anything loads."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag_of(args, dest)} must be a finite number, got {v}")
