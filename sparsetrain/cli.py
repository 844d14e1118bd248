"""`sparsetrain-train` (and `python train.py` in a source checkout): compose the Hydra config and train.

A mistake in the input (config, data path, checkpoint) ends in one line that names the fix and exit code 2, not
a traceback; HYDRA_FULL_ERROR=1 shows the traceback.
"""
import os
import sys
from pathlib import Path

import hydra
# Imported before Hydra sets up logging, so that conf/hydra/default.yaml can take back the console handlers
# Lightning gives its loggers at import (each line would print twice).
import lightning.pytorch  # noqa: F401
from omegaconf import DictConfig

import sparsetrain.training.resolvers  # noqa: F401  (registers ${job_dirname:...})
from sparsetrain.training.config_errors import composed, one_line_errors

# Where an installed package keeps conf/ (recipes in conf/recipe); a source checkout has them at its top.
PACKAGED_CONFIGS = Path(__file__).resolve().with_name("conf")


def train_job(cfg: DictConfig):
    composed()
    from sparsetrain.training.app import train
    from sparsetrain.training.errors import USER_ERRORS

    try:
        summary = train(cfg)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"sparsetrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("objective")


def main(config_dir: Path = PACKAGED_CONFIGS) -> None:
    with one_line_errors():
        hydra.main(version_base="1.3", config_path=str(config_dir), config_name="train")(train_job)()


if __name__ == "__main__":
    main()
