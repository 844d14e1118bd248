"""Compose the real configs (conf/ + recipes/) the way train.py does, shrunk to CPU test size."""
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from sparsetrain.training import resolvers  # noqa: F401  (the configs' ${if_cuda:...} and ${job_dirname:...})

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))

# Small enough for a 2-core CPU, big enough to exercise every layer type: synthetic 32 px images.
TINY = ["data=synthetic", "data.img_size=32", "data.batch_size=4", "data.train_size=32", "data.val_size=16",
        "data.num_workers=0", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_epochs=1",
        "trainer.max_steps=2", "trainer.limit_val_batches=1", "logger=csv", "trainer.enable_progress_bar=false",
        "sched.warmup_steps=0"]


def compose_cfg(overrides, run_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
        del cfg["hydra"]  # train.py's cfg has no hydra node either; HydraConfig keeps it
    return cfg


def run_cli(args, cwd, timeout=600, env=None):
    """python train.py ARGS as a user would type it; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
