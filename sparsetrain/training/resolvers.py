"""OmegaConf resolvers that the configs use; registered once when train.py imports this module."""
import hashlib

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


def register() -> None:
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)


register()
