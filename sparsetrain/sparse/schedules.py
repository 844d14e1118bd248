"""Pruning schedules: step -> Phase. Pure Python, no torch: the training callback asks
`schedule.phase(step)` every step and applies the answer to the sparse modules.

Timeline of every schedule:

    [dense_warmup] -> [pruning / sparse ...] -> [dense_finetune, if dense_final_fraction > 0]

Phase names: "dense_warmup" (sparsity off), "pruning" (sparsity on and the level moves or the
mask is (re)computed for a new level), "sparse" (sparsity on at a settled level),
"dense_finetune" (sparsity off again for the last part of training).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("constant", "one_shot", "gradual", "iterative")
PATTERNS = ("semi24", "act24", "block")
SEMI_STRUCTURED_PATTERNS = ("semi24", "act24")
SEMI_STRUCTURED_LEVEL = 0.5


@dataclass(frozen=True)
class Phase:
    """What the sparse modules do at one step.

    name: "dense_warmup" | "pruning" | "sparse" | "dense_finetune".
    active: run the sparse path (False = plain dense layer).
    level: sparsity level the mask should have (0.5 for 2:4; 0.0 when inactive).
    update_mask: recompute the mask at this step (from the current weights or scores).
    zero_pruned: a layer that was sparse until now sets its pruned weights to zero before going dense
        (only the final dense fine-tune asks for it; see PruneSchedule.dense_final_pruned).
    mask_final: no later step of the schedule changes the mask: pruned weights can never serve a forward
        again while it is sparse, so block layers give them no gradient (and compute none: the block-sparse
        weight gradient) whatever their grad_mode.
    """

    name: str
    active: bool
    level: float
    update_mask: bool
    zero_pruned: bool = False
    mask_final: bool = False


DENSE_WARMUP = Phase("dense_warmup", active=False, level=0.0, update_mask=False)
DENSE_FINAL_PRUNED = ("zero", "keep")


def _check_step(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative int (a training step)")


def cubic_level(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3, clamped to
    [t0, t1]. Prunes fast early, when there are many redundant weights, and slowly near the end."""
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass
class PruneSchedule:
    """When sparsity is on, at which level, and when masks are recomputed.

    kind:
        "constant": sparse at `target` from `dense_warmup_steps` on; the mask is recomputed
            every `update_every` steps (every step for a dynamic 2:4 mask) until
            `freeze_mask_after`.
        "one_shot": dense until `prune_step`; the mask is computed once there and kept.
        "gradual": cubic ramp (Zhu & Gupta) of the level from `initial_level` at `start_step` to
            `target` at `end_step`, the mask recomputed every `update_every` steps; afterwards
            sparse at `target`, still updated every `update_every` steps until
            `freeze_mask_after` (set it to `end_step` for the paper's fixed final mask).
            Block sparsity only: a 2:4 pattern is either on or off.
        "iterative": `cycles` prune/fine-tune cycles of `cycle_steps` each from `start_step`;
            cycle c (0-based) prunes at its first step to
            initial_level + (target - initial_level) * (c + 1) / cycles and then fine-tunes with
            that mask. Block sparsity only.
    pattern: "semi24" | "act24" | "block" — the sparsity config's pattern; it fixes which kinds
        and levels make sense.
    target: final sparsity level. For 2:4 patterns it is 0.5 (None means that); for block
        sparsity it is required (usually BlockConfig.sparsity).
    initial_level: level at the start of a gradual ramp or before the first iterative cycle.
    dense_warmup_steps: steps trained dense before any sparsity.
    prune_step: one_shot's pruning step (default: dense_warmup_steps).
    start_step, end_step: gradual ramp window; iterative uses start_step (default for both:
        dense_warmup_steps).
    end_fraction: gradual only, instead of end_step: the ramp ends at round(end_fraction * total_steps).
    update_every: mask recomputation period (steps) for constant and gradual.
    freeze_mask_after: the mask is not recomputed at any step after this one (constant, gradual).
    freeze_after_ramp: gradual only: freeze_mask_after = end_step, the paper's fixed final mask. The rest of
        the run is then a frozen phase (Phase.mask_final): the block kernels' index is built once and pruned
        blocks get no weight gradient.
    dense_final_fraction: the last round(fraction * total_steps) steps run dense again (the
        torchao DINOv2 recipe trains 70% sparse, then dense). Needs total_steps.
    total_steps: length of training; required only by dense_final_fraction.
    dense_final_pruned: what the pruned weights start the final dense phase from. "zero": the
        dense phase starts from the sparse network itself, so the function is continuous at the
        switch (Dense-Sparse-Dense training, Han et al. 2017). "keep": the values the straight-through
        estimator went on updating while they were pruned, which never served a forward pass.
    cycles, cycle_steps: iterative's cycle count and length.
    """

    kind: str = "constant"
    pattern: str = "semi24"
    target: float | None = None
    initial_level: float = 0.0
    dense_warmup_steps: int = 0
    prune_step: int | None = None
    start_step: int | None = None
    end_step: int | None = None
    end_fraction: float | None = None
    update_every: int = 1
    freeze_mask_after: int | None = None
    freeze_after_ramp: bool = False
    dense_final_fraction: float = 0.0
    total_steps: int | None = None
    dense_final_pruned: str = "zero"
    cycles: int | None = None
    cycle_steps: int | None = None

    def __post_init__(self) -> None:
        self._check_kind_and_pattern()
        self.target = self._resolved_target()
        self._check_knobs_belong_to_kind()
        self._resolve_ramp_end()
        self._check_steps()

    # -- validation -------------------------------------------------------------------------

    def _check_kind_and_pattern(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not known; use one of {list(KINDS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} is not known; use one of {list(PATTERNS)}")
        if self.pattern in SEMI_STRUCTURED_PATTERNS and self.kind in ("gradual", "iterative"):
            raise ValueError(
                f"kind={self.kind!r} ramps a sparsity level, but a {self.pattern} pattern is either on "
                "or off at 50%; use kind='constant' (dynamic mask) or 'one_shot', or pattern='block'"
            )

    def _resolved_target(self) -> float:
        if self.pattern in SEMI_STRUCTURED_PATTERNS:
            if self.target not in (None, SEMI_STRUCTURED_LEVEL):
                raise ValueError(
                    f"target={self.target} with pattern {self.pattern!r}: 2:4 is always 50% sparse; "
                    "leave target unset (or 0.5)"
                )
            return SEMI_STRUCTURED_LEVEL
        if self.target is None:
            raise ValueError("a block schedule needs target=<fraction of blocks pruned>, e.g. BlockConfig.sparsity")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target={self.target} must be in [0, 1)")
        if not 0.0 <= self.initial_level <= self.target:
            raise ValueError(f"initial_level={self.initial_level} must be in [0, target={self.target}]")
        return float(self.target)

    def _check_knobs_belong_to_kind(self) -> None:
        owners = {
            "prune_step": ("one_shot",),
            "start_step": ("gradual", "iterative"),
            "end_step": ("gradual",),
            "end_fraction": ("gradual",),
            "freeze_mask_after": ("constant", "gradual"),
            "cycles": ("iterative",),
            "cycle_steps": ("iterative",),
        }
        for knob, kinds in owners.items():
            if getattr(self, knob) is not None and self.kind not in kinds:
                raise ValueError(
                    f"{knob} is only used by kind {' or '.join(map(repr, kinds))}, not {self.kind!r}; remove it"
                )
        if self.freeze_after_ramp and self.kind != "gradual":
            raise ValueError(f"freeze_after_ramp is only used by kind 'gradual', not {self.kind!r}; remove it")
        if self.kind == "gradual" and (self.end_step is None) == (self.end_fraction is None):
            raise ValueError("kind='gradual' needs one of end_step (the step where the ramp reaches target) or "
                             "end_fraction (that step as a fraction of the run)")
        if self.kind == "iterative" and (self.cycles is None or self.cycle_steps is None):
            raise ValueError("kind='iterative' needs cycles and cycle_steps")

    def _resolve_ramp_end(self) -> None:
        """end_fraction -> end_step, and freeze_after_ramp -> freeze_mask_after."""
        if self.end_fraction is not None:
            if not 0.0 < self.end_fraction <= 1.0:
                raise ValueError(f"end_fraction={self.end_fraction} must be in (0, 1]: the fraction of the run "
                                 "after which the ramp has reached the target")
            if self.total_steps is None:
                raise ValueError("end_fraction needs total_steps (the fraction is of the whole run)")
            self.end_step = max(self.sparse_start + 1, round(self.end_fraction * self.total_steps))
        if self.freeze_after_ramp:
            if self.freeze_mask_after is not None:
                raise ValueError("set freeze_after_ramp or freeze_mask_after, not both")
            self.freeze_mask_after = self.end_step

    def _check_steps(self) -> None:
        for knob in ("dense_warmup_steps", "prune_step", "start_step", "end_step", "freeze_mask_after", "total_steps"):
            _check_step(knob, getattr(self, knob))
        for knob in ("update_every", "cycles", "cycle_steps"):
            value = getattr(self, knob)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{knob}={value!r} must be a positive int")
        for knob in ("prune_step", "start_step"):
            value = getattr(self, knob)
            if value is not None and value < self.dense_warmup_steps:
                raise ValueError(
                    f"{knob}={value} is before the end of dense warm-up ({self.dense_warmup_steps}); "
                    f"set {knob} >= dense_warmup_steps or shorten the warm-up"
                )
        if self.kind == "gradual" and self.end_step <= self.sparse_start:
            raise ValueError(f"end_step={self.end_step} must be after start_step={self.sparse_start}")
        if self.freeze_mask_after is not None:
            earliest = self.end_step if self.kind == "gradual" else self.sparse_start
            if self.freeze_mask_after < earliest:
                raise ValueError(
                    f"freeze_mask_after={self.freeze_mask_after} would freeze the mask before "
                    f"it is computed for the final level; set it >= {earliest}"
                )
        self._check_dense_final()

    def _check_dense_final(self) -> None:
        if not 0.0 <= self.dense_final_fraction < 1.0:
            raise ValueError(f"dense_final_fraction={self.dense_final_fraction} must be in [0, 1)")
        if self.dense_final_pruned not in DENSE_FINAL_PRUNED:
            raise ValueError(f"dense_final_pruned={self.dense_final_pruned!r} is not known; use one of "
                             f"{list(DENSE_FINAL_PRUNED)}")
        if self.dense_final_fraction == 0.0:
            return
        if self.total_steps is None:
            raise ValueError("dense_final_fraction needs total_steps (the fraction is of the whole run)")
        if self.dense_final_start < self._scheduled_sparse_end:
            raise ValueError(
                f"the dense fine-tune would start at step {self.dense_final_start}, before the sparse "
                f"schedule is done (step {self._scheduled_sparse_end}); lower dense_final_fraction "
                "or finish the sparse schedule earlier"
            )

    # -- derived steps ----------------------------------------------------------------------

    @property
    def sparse_start(self) -> int:
        """First step with sparsity on."""
        if self.kind == "one_shot" and self.prune_step is not None:
            return self.prune_step
        if self.kind in ("gradual", "iterative") and self.start_step is not None:
            return self.start_step
        return self.dense_warmup_steps

    @property
    def _scheduled_sparse_end(self) -> int:
        """First step after the part of the schedule that must run sparse: the first sparse step,
        the whole gradual ramp, or all iterative cycles."""
        if self.kind == "gradual":
            return self.end_step + 1
        if self.kind == "iterative":
            return self.sparse_start + self.cycles * self.cycle_steps
        return self.sparse_start + 1

    @property
    def dense_final_start(self) -> int | None:
        """First step of the final dense fine-tune, or None when there is none."""
        if self.dense_final_fraction == 0.0:
            return None
        return self.total_steps - round(self.dense_final_fraction * self.total_steps)

    # -- the schedule -------------------------------------------------------------------------

    def phase(self, step: int) -> Phase:
        _check_step("step", step)
        if self.dense_final_start is not None and step >= self.dense_final_start:
            return Phase("dense_finetune", active=False, level=0.0, update_mask=False,
                         zero_pruned=self.dense_final_pruned == "zero")
        if step < self.sparse_start:
            return DENSE_WARMUP
        if self.kind == "one_shot":
            first = step == self.sparse_start
            return Phase("pruning" if first else "sparse", True, self.target, update_mask=first, mask_final=not first)
        if self.kind == "iterative":
            return self._iterative_phase(step)
        if self.kind == "gradual" and step <= self.end_step:
            level = cubic_level(step, self.sparse_start, self.end_step, self.initial_level, self.target)
            due = self._periodic_update_due(step) or step == self.end_step
            return Phase("pruning", True, level, update_mask=due)
        frozen_for_good = self.freeze_mask_after is not None and step > self.freeze_mask_after
        return Phase("sparse", True, self.target, update_mask=self._periodic_update_due(step),
                     mask_final=frozen_for_good)

    def _periodic_update_due(self, step: int) -> bool:
        if self.freeze_mask_after is not None and step > self.freeze_mask_after:
            return False
        return (step - self.sparse_start) % self.update_every == 0

    def _iterative_phase(self, step: int) -> Phase:
        cycle, offset = divmod(step - self.sparse_start, self.cycle_steps)
        if cycle >= self.cycles:
            return Phase("sparse", True, self.target, update_mask=False, mask_final=True)
        level = self.initial_level + (self.target - self.initial_level) * (cycle + 1) / self.cycles
        first = offset == 0
        return Phase("pruning" if first else "sparse", True, level, update_mask=first,
                     mask_final=cycle == self.cycles - 1 and not first)
