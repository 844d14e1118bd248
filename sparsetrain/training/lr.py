"""Learning-rate schedules as per-step multipliers (for torch.optim.lr_scheduler.LambdaLR)."""
import math

SCHEDULES = ("cosine", "constant")


def lr_multiplier(step: int, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up to 1, then `cosine` decay to min_lr_ratio or `constant` at 1."""
    # Checked before the warm-up branch: LambdaLR calls this at step 0 when it is built, so a typo
    # fails at start-up instead of when the warm-up ends.
    if name not in SCHEDULES:
        raise ValueError(f"unknown sched.name {name!r}: use one of {list(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
