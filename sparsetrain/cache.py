"""The cache directory: $SPARSETRAIN_CACHE, default ~/.cache/sparsetrain. It holds what this machine measured or
built once (cuSPARSELt algorithms, block-kernel configurations, the plan-cache library) and decoded datasets."""
import os
import pathlib


def cache_dir() -> pathlib.Path:
    # Looked up at each use: tests and scripts point $SPARSETRAIN_CACHE elsewhere after import.
    return pathlib.Path(os.environ.get("SPARSETRAIN_CACHE", pathlib.Path.home() / ".cache" / "sparsetrain"))
