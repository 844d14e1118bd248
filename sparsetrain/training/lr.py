"""Learning-rate schedules as per-step multipliers (for torch.optim.lr_scheduler.LambdaLR)."""
import math


def lr_multiplier(step: int, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up to 1, then `cosine` decay to min_lr_ratio or `constant` at 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name != "cosine":
        raise ValueError(f"unknown sched.name {name!r}: use cosine or constant")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
