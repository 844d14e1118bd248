import pytest

from sparsetrain.sparse.schedules import Phase, PruneSchedule, cubic_level


def test_constant_with_dense_warmup_and_dynamic_mask():
    s = PruneSchedule(kind="constant", pattern="semi24", dense_warmup_steps=3)
    assert s.phase(0) == Phase("dense_warmup", active=False, level=0.0, update_mask=False)
    assert s.phase(2).name == "dense_warmup"
    assert s.phase(3) == Phase("sparse", active=True, level=0.5, update_mask=True)
    assert s.phase(1000).update_mask


def test_constant_updates_every_n_steps_until_frozen():
    s = PruneSchedule(kind="constant", pattern="semi24", dense_warmup_steps=2, update_every=3, freeze_mask_after=8)
    assert [s.phase(t).update_mask for t in range(2, 13)] == [
        True, False, False, True, False, False, True, False, False, False, False
    ]
    # Only after the freeze is the mask final: between periodic updates it is merely held.
    assert [s.phase(t).mask_final for t in range(2, 13)] == [False] * 7 + [True] * 4


def test_gradual_with_a_frozen_mask_after_its_ramp_has_a_final_mask():
    s = PruneSchedule(kind="gradual", pattern="block", target=0.9, end_step=100, freeze_mask_after=100)
    assert s.phase(100).update_mask and not s.phase(100).mask_final
    assert s.phase(101) == Phase("sparse", active=True, level=0.9, update_mask=False, mask_final=True)
    assert not PruneSchedule(kind="gradual", pattern="block", target=0.9, end_step=100).phase(500).mask_final


def test_one_shot_prunes_once_at_its_step():
    s = PruneSchedule(kind="one_shot", pattern="semi24", prune_step=5)
    assert not s.phase(4).active
    assert s.phase(5) == Phase("pruning", active=True, level=0.5, update_mask=True)
    assert s.phase(6) == Phase("sparse", active=True, level=0.5, update_mask=False, mask_final=True)


def test_gradual_follows_the_cubic_ramp():
    s = PruneSchedule(kind="gradual", pattern="block", target=0.8, start_step=10, end_step=110, update_every=10)
    assert s.phase(9).name == "dense_warmup"
    assert s.phase(10) == Phase("pruning", active=True, level=0.0, update_mask=True)
    assert s.phase(60).level == pytest.approx(0.8 * (1 - 0.5**3))
    assert s.phase(35).level == pytest.approx(0.8 * (1 - 0.75**3))
    assert not s.phase(35).update_mask and s.phase(40).update_mask
    assert s.phase(110) == Phase("pruning", active=True, level=pytest.approx(0.8), update_mask=True)
    assert s.phase(111) == Phase("sparse", active=True, level=0.8, update_mask=False)
    assert s.phase(120).update_mask  # after the ramp the mask keeps following the weights ...
    frozen = PruneSchedule(kind="gradual", pattern="block", target=0.8, end_step=100, freeze_mask_after=100)
    assert not frozen.phase(200).update_mask  # ... unless frozen, as in Zhu & Gupta


def test_gradual_ends_off_the_update_grid_still_updates_at_end():
    s = PruneSchedule(kind="gradual", pattern="block", target=0.5, start_step=0, end_step=7, update_every=3)
    assert s.phase(7).update_mask and s.phase(7).level == pytest.approx(0.5)


def test_cubic_level_is_clamped_outside_the_window():
    assert cubic_level(-5, 0, 10, 0.1, 0.9) == pytest.approx(0.1)
    assert cubic_level(50, 0, 10, 0.1, 0.9) == pytest.approx(0.9)


def test_gradual_ramp_can_end_at_a_fraction_of_the_run_and_freeze_there():
    s = PruneSchedule(kind="gradual", pattern="block", target=0.9, end_fraction=0.3, total_steps=1000,
                      freeze_after_ramp=True)
    assert (s.end_step, s.freeze_mask_after) == (300, 300)
    assert s.phase(300).update_mask and s.phase(300).level == pytest.approx(0.9)
    assert s.phase(301).mask_final and not s.phase(301).update_mask


def test_iterative_cycles_ramp_the_level():
    s = PruneSchedule(kind="iterative", pattern="block", target=0.9, initial_level=0.0,
                      dense_warmup_steps=2, cycles=3, cycle_steps=10)
    assert s.phase(1).name == "dense_warmup"
    assert s.phase(2) == Phase("pruning", active=True, level=pytest.approx(0.3), update_mask=True)
    assert s.phase(11) == Phase("sparse", active=True, level=pytest.approx(0.3), update_mask=False)
    assert s.phase(12) == Phase("pruning", active=True, level=pytest.approx(0.6), update_mask=True)
    assert s.phase(22).level == pytest.approx(0.9) and s.phase(22).update_mask and not s.phase(22).mask_final
    assert s.phase(23).mask_final  # the last cycle's mask stays to the end
    assert s.phase(40) == Phase("sparse", active=True, level=0.9, update_mask=False, mask_final=True)


def test_dense_final_fraction_runs_the_end_dense():
    s = PruneSchedule(kind="constant", pattern="semi24", dense_final_fraction=0.3, total_steps=100)
    assert s.phase(69).active
    assert s.phase(70) == Phase("dense_finetune", active=False, level=0.0, update_mask=False, zero_pruned=True)
    assert s.phase(99).name == "dense_finetune"


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="gradual", pattern="semi24", end_step=10), "either on or off"),
    (dict(kind="iterative", pattern="act24", cycles=2, cycle_steps=5), "either on or off"),
    (dict(kind="constant", pattern="semi24", target=0.7), "always 50% sparse"),
    (dict(kind="constant", pattern="block"), "needs target"),
    (dict(kind="constant", pattern="block", target=1.0), r"\[0, 1\)"),
    (dict(kind="gradual", pattern="block", target=0.5), "needs one of end_step"),
    (dict(kind="gradual", pattern="block", target=0.5, start_step=10, end_step=10), "must be after"),
    (dict(kind="iterative", pattern="block", target=0.5, cycles=2), "needs cycles and cycle_steps"),
    (dict(kind="constant", prune_step=3), "only used by kind 'one_shot'"),
    (dict(kind="one_shot", prune_step=2, dense_warmup_steps=5), "before the end of dense warm-up"),
    (dict(kind="constant", update_every=0), "positive int"),
    (dict(kind="constant", dense_warmup_steps=-1), "non-negative int"),
    (dict(kind="constant", dense_final_fraction=0.3), "needs total_steps"),
    (dict(kind="constant", dense_final_fraction=1.0, total_steps=10), r"\[0, 1\)"),
    (dict(kind="gradual", pattern="block", target=0.5, end_step=90, dense_final_fraction=0.2, total_steps=100),
     "lower dense_final_fraction"),
    (dict(kind="gradual", pattern="block", target=0.5, end_step=90, freeze_mask_after=50), "set it >= 90"),
    (dict(kind="one_shot", freeze_mask_after=50), "only used by kind"),
    (dict(kind="gradual", pattern="block", target=0.5, end_step=9, end_fraction=0.3, total_steps=90), "one of end_step"),
    (dict(kind="gradual", pattern="block", target=0.5, end_fraction=0.3), "needs total_steps"),
    (dict(kind="gradual", pattern="block", target=0.5, end_fraction=1.5, total_steps=90), r"in \(0, 1\]"),
    (dict(kind="constant", freeze_after_ramp=True), "only used by kind 'gradual'"),
    (dict(kind="gradual", pattern="block", target=0.5, end_step=9, freeze_after_ramp=True, freeze_mask_after=20),
     "not both"),
    (dict(kind="linear"), "not known"),
])
def test_invalid_schedules_fail_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSchedule(**kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        PruneSchedule().phase(-1)
