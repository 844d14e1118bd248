"""Train a (sparse) vision model: `python train.py recipe=fmnist_vit_24 [overrides...]`."""
import os
import sys

import hydra
from omegaconf import DictConfig

import sparsetrain.training.resolvers  # noqa: F401  (registers ${job_dirname:...})
from sparsetrain.training.config_errors import composed, one_line_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    composed()
    from sparsetrain.training.app import train
    from sparsetrain.training.errors import USER_ERRORS

    try:
        summary = train(cfg)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One line that names the fix, not a traceback: these are mistakes in the input.
        print(f"sparsetrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("objective")


if __name__ == "__main__":
    with one_line_errors():
        main()
