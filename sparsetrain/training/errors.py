"""The exceptions that mean "the input is wrong" (config, data path, checkpoint), as opposed to bugs.
sparsetrain.cli prints these as one line naming the fix; HYDRA_FULL_ERROR=1 shows the traceback."""
from sparsetrain.training.checkpoints import CheckpointError


class ConfigError(ValueError):
    """A config value that cannot work; the message names the fix."""


USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, ValueError, ImportError)
