"""scripts/accuracy_table.py's bookkeeping, on fake run directories: the ASP row starts from the dense run of
its own seed, trains after it, and is judged against both the dense model it came from and dense trained as
long; a method's overrides win over the model's."""
import json
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import accuracy_table  # noqa: E402


def fake_run(root, model, method, seed, acc, steps=1404):
    run = accuracy_table.runs_of(model, method, [seed], root)[0]
    run.dir.mkdir(parents=True)
    (run.dir / "summary.json").write_text(json.dumps({"metrics": {"val/acc": acc}, "global_step": steps,
                                                      "device": "cpu"}))


def test_asp_starts_from_the_dense_run_of_its_own_seed(tmp_path):
    run = accuracy_table.runs_of("resnet", "semi24_prune_trained", [1], tmp_path)[0]
    expected = tmp_path / "fmnist_resnet_24" / "resnet-dense-s1" / "checkpoints" / "last.ckpt"
    assert f"model.pretrained_path={expected}" in run.overrides
    assert "prune_schedule.finetune_epochs=3" in run.overrides


def test_a_methods_overrides_win_over_the_models(tmp_path):
    overrides = accuracy_table.runs_of("resnet", "dense_6ep", [0], tmp_path)[0].overrides
    assert "trainer.max_epochs=6" in overrides and "trainer.max_epochs=3" not in overrides
    assert "trainer.max_epochs=3" in accuracy_table.runs_of("resnet", "dense", [0], tmp_path)[0].overrides


def test_asp_is_judged_against_its_dense_model_and_dense_trained_as_long(tmp_path):
    for seed, (dense, asp, long) in enumerate([(0.870, 0.882, 0.885), (0.872, 0.880, 0.883)]):
        fake_run(tmp_path, "vit", "dense", seed, dense)
        fake_run(tmp_path, "vit", "semi24_prune_trained", seed, asp)
        fake_run(tmp_path, "vit", "dense_6ep", seed, long, steps=2808)
    line = next(t for t in accuracy_table.targets("vit", tmp_path) if "ASP recipe" in t)
    assert "met (+1.00 pt vs the dense model it was pruned from; -0.30 pt vs dense trained as long)" in line
    asp_row = next(r for r in accuracy_table.table(tmp_path).splitlines() if "ASP recipe" in r)
    assert "| 1404 dense + 1404 |" in asp_row


def test_asp_runs_train_after_the_dense_runs(tmp_path, monkeypatch):
    waves = []
    monkeypatch.setattr(accuracy_table, "train_all", lambda runs, jobs: waves.append([r.name for r in runs]) or [])
    accuracy_table.main(["--model", "vit", "--only", "semi24_prune_trained,dense", "--seeds", "0",
                         "--out", str(tmp_path / "table.md"), "--notes", str(tmp_path / "none.md")])
    assert waves == [["vit-dense-s0"], ["vit-semi24_prune_trained-s0"]]


def test_dress_with_a_fixed_final_mask_is_judged_against_magnitude_on_the_same_schedule(tmp_path):
    for seed, (dense, dress, magnitude) in enumerate([(0.880, 0.873, 0.860), (0.879, 0.871, 0.858)]):
        fake_run(tmp_path, "resnet", "dense", seed, dense)
        fake_run(tmp_path, "resnet", "block80_dress_freeze", seed, dress)
        fake_run(tmp_path, "resnet", "block80_mag_freeze", seed, magnitude)
    lines = accuracy_table.targets("resnet", tmp_path)
    line = next(t for t in lines if "mask fixed after the ramp" in t)
    assert "met (-0.75 pt vs dense, +1.30 pt vs magnitude (ste), both with the mask fixed" in line
    # the plain DRESS rows did not run: their two lines say so instead of judging the variant's runs
    assert sum("not run yet" in t and "DRESS" in t for t in lines) == 2 and len(lines) == 8


def test_every_linear_block_rows_drop_the_mlp_scope_the_other_vit_block_rows_keep(tmp_path):
    scoped = accuracy_table.runs_of("vit", "block80_dress", [0], tmp_path)[0].overrides
    every = accuracy_table.runs_of("vit", "block80_dress_all", [0], tmp_path)[0].overrides
    assert "sparsity.include=[blocks.*.mlp.*]" in scoped
    assert not any(o.startswith("sparsity.include") for o in every) and "sparsity=dress" in every
