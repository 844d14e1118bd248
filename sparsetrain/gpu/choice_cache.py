"""Choices measured on this machine (block-sparse kernel configurations, cuSPARSELt algorithms), kept in
a JSON file under the cache directory so that a new process starts with them instead of measuring again.

The directory is `sparsetrain.cache.cache_dir()`. Each choice's key names the GPU and the library versions it
was measured with, so one file serves several machines and upgrades. A damaged file costs a new measurement,
never a failed run.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
from typing import Any

import torch

from sparsetrain.cache import cache_dir

logger = logging.getLogger("sparsetrain")


@functools.cache
def device_label(device: torch.device) -> str:
    """The device as choice keys name it: the GPU model and its compute capability."""
    if device.type != "cuda":
        return str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"


class ChoiceFile:
    """One JSON object of key -> choice in the cache directory, read whole and merged one key at a time."""

    def __init__(self, filename: str, what: str):
        self.filename = filename
        self.what = what  # for messages: "block-sparse tuning", ...

    @property
    def path(self) -> pathlib.Path:
        # Looked up at each use: tests and scripts point $SPARSETRAIN_CACHE elsewhere after import.
        return cache_dir() / self.filename

    def read(self) -> dict[str, Any]:
        path = self.path
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError(f"expected a JSON object, found {type(stored).__name__}")
            return stored
        except FileNotFoundError:
            return {}
        except ValueError as error:
            logger.warning("ignoring %s (%s); the %s will be measured again", path, error, self.what)
            return {}

    def persist(self, key: str, value: Any) -> None:
        """Merge one entry into the file (re-read first: other processes may have added keys), atomically."""
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = self.read()
            merged[key] = value
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            tmp.replace(path)  # a reader sees the old file or the new one
        except OSError as error:
            logger.warning("could not save the %s to %s (%s); it holds for this process only", self.what, path, error)
