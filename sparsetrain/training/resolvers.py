"""OmegaConf resolvers that the configs use; registered once when train.py imports this module."""
import hashlib

import torch
from omegaconf import OmegaConf

# File systems cap a path component at 255 bytes; a sweep job's directory is named from its overrides.
MAX_DIRNAME = 120


def job_dirname(overrides: str) -> str:
    """The overrides as a directory name, shortened with a hash when too long (still stable and unique)."""
    name = overrides.replace("/", "_") or "default"
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[:MAX_DIRNAME - 11]}-{digest}"


def trains_on_cuda(accelerator) -> bool:
    """Whether Lightning will train on CUDA GPUs: trainer.accelerator auto/gpu/cuda and one is visible."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def if_cuda(accelerator: str, on_gpu, otherwise):
    """`on_gpu` when this run trains on a CUDA GPU, else `otherwise`: for recipes whose GPU settings
    (bf16, the kernels) cannot run on a CPU."""
    return on_gpu if trains_on_cuda(accelerator) else otherwise


def register() -> None:
    for name, resolver in (("job_dirname", job_dirname), ("if_cuda", if_cuda)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register()
