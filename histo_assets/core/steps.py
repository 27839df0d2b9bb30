"""Which training steps are evaluated: every checkpoint, and step 0, the plain base model.

Step 0 is the baseline a lab asks about first: with the same prompt and no
hypernetwork, does the base model already make these images? It is generated
and scored like a checkpoint, so it sits in every table, plot and grid, but it
is never released: its images carry no class-specific training.
"""

from collections.abc import Iterable

BASELINE_STEP = 0


def evaluated_steps(checkpoint_steps: Iterable[int]) -> list[int]:
    steps = sorted({int(step) for step in checkpoint_steps})
    if steps and steps[0] <= BASELINE_STEP:
        raise ValueError(f"checkpoint steps must be positive: step {BASELINE_STEP} is the base model itself, got {steps[0]}")
    return [BASELINE_STEP, *steps]
