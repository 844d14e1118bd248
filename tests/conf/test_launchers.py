"""SLURM cannot run here, so the cluster configs are checked to compose into what submitit needs."""
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import ROOT


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_with_requeue_and_one_task_per_gpu():
    cfg = _compose(["recipe=vit_l_24", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                    "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 4
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert any("NCCL_NVLS_ENABLE=0" in line for line in launcher.setup)


def test_optuna_sweeper_composes_and_maximises_the_objective():
    cfg = _compose(["recipe=fmnist_vit_24", "hparams_search=fmnist_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and "optim.lr" in sweeper.params
    assert cfg.objective == "val/acc"
