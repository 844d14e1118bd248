"""Train a (sparse) vision model: `python train.py recipe=fmnist_vit_24 [overrides...]`.

The same command as the installed `sparsetrain-train`, with the configs of this checkout (conf/, recipes/).
"""
from pathlib import Path

from sparsetrain.cli import main

if __name__ == "__main__":
    main(config_dir=Path(__file__).resolve().parent / "conf")
