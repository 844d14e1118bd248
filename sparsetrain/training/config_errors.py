"""Mistakes Hydra finds while composing the config (an unknown recipe or option, a key no config file sets, a
YAML syntax error, a malformed override) as one line that names the fix, and exit code 2.

Hydra prints these over many lines and exits 1, unless HYDRA_FULL_ERROR=1, when it raises them instead. So
`one_line_errors` sets that variable while Hydra composes and reports what it raises; the task function calls
`composed()` first, which gives the user's setting back, so that everything after composition is reported
the usual way. A user who set HYDRA_FULL_ERROR=1 gets the traceback.
"""
import difflib
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional

import yaml
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

FULL_ERROR = "HYDRA_FULL_ERROR"
_user_setting: list[Optional[str]] = []


@contextmanager
def one_line_errors():
    """Around the call of a @hydra.main function: its composition errors end in one line and exit code 2."""
    _user_setting.append(os.environ.get(FULL_ERROR))
    wants_traceback = _user_setting[-1] == "1"
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as e:
        if wants_traceback:
            raise
        print(f"sparsetrain: error: {describe(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        composed()


def composed() -> None:
    """Composition is over: HYDRA_FULL_ERROR is the user's again."""
    if _user_setting:
        setting = _user_setting.pop()
        if setting is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = setting


def describe(error: BaseException) -> str:
    """One line for a composition error: what is wrong, where, and the fix."""
    syntax = _yaml_error_in(error)
    if syntax is not None:
        return _yaml_message(syntax)
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return unknown_option_message(group, name, error.options)
    if isinstance(error, OverrideParseException):
        return f"{error.override}: {_first_line(error.message)} (the override syntax: https://hydra.cc/docs/" \
               "advanced/override_grammar/basic)"
    if isinstance(error.__cause__, (ConfigKeyError, ConfigAttributeError)) and error.__cause__.parent_node is not None:
        return _unknown_key(error, error.__cause__)
    return _flatten(str(error))


def unknown_option_message(group: str, name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    guess = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={name}: no such {group} option; {guess}(the options: {', '.join(options)})"


def _unknown_key(error: HydraException, cause: OmegaConfBaseException) -> str:
    # Imported here: the schema needs torch and Lightning, which the other messages can do without.
    from sparsetrain.training.config_schema import target_schema, unknown_key_message
    from sparsetrain.training.errors import ConfigError

    # Hydra's message ends with the override a `+` would append: "To append to your config use +KEY=VALUE".
    appended = re.search(r"use \+(\S+)\s*$", str(error))
    override = appended.group(1) if appended else cause.full_key
    node = cause.parent_node
    parent = cause.full_key.rpartition(".")[0]
    known, owner = [str(key) for key in node.keys()], parent or "the config"
    target = node.get("_target_") if OmegaConf.is_dict(node) else None
    if target is not None:
        try:
            parameters = [f.name for f in fields(target_schema({"_target_": target}, parent)[0])]
        except ConfigError as unimportable:
            return str(unimportable)
        if cause.key in parameters:
            return (f"{override}: {target} takes {cause.key}, but the config files leave it at its default: "
                    f"set it with +{override}")
        known, owner = known + parameters, target
    return unknown_key_message(cause.full_key, override, known, owner)


def _yaml_error_in(error: BaseException) -> Optional[yaml.MarkedYAMLError]:
    while error is not None and not isinstance(error, yaml.MarkedYAMLError):
        error = error.__cause__ or error.__context__
    return error


def _yaml_message(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark
    where = f"{_shown_path(mark.name)} line {mark.line + 1}, column {mark.column + 1}"
    context = ""
    if error.context and error.context_mark is not None:
        context = f" ({error.context} from line {error.context_mark.line + 1}, column {error.context_mark.column + 1})"
    return f"{where}: YAML syntax error, {error.problem}{context}; fix the file"


def _shown_path(name: str) -> str:
    """The file as the user edits it (conf/recipe links to recipes/), relative to here when below it."""
    path = Path(name).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _flatten(message: str) -> str:
    """Hydra's multi-line message as one line: its first line, and the options it lists after it."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    head, listed = lines[0], []
    for line in lines[1:]:
        if line.startswith(("Available options", "Config search path")):
            continue
        if line.startswith("provider="):
            break
        listed.append(line)
    return f"{head} (the options: {', '.join(listed)})" if listed else head


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0]
