"""Run a training script's `main` in this process (fast; no interpreter start-up per run)."""

from accelerate.state import AcceleratorState, GradientState


def run_script(script, argv):
    """`script.main(script.parse_args(argv))`, after resetting accelerate's process-wide singletons, which would
    otherwise carry the previous run's state (mixed precision, accumulation) into this one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return script.main(script.parse_args(argv))
