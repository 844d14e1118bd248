import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _own_choice_cache(tmp_path_factory):
    """Tests store tuned kernels and cuSPARSELt algorithms in a folder of their own, never in the user's
    cache, unless the caller chose one ($SPARSETRAIN_CACHE, as the GPU scripts do to keep the plan cache)."""
    os.environ.setdefault("SPARSETRAIN_CACHE", str(tmp_path_factory.mktemp("sparsetrain-cache")))
    yield
