"""The config's schema, checked right after composition, before anything is built.

Every key of the composed config must be one the schema knows, hold a value of the schema's type and lie in its
bounds; anything else stops the run with a ConfigError of one line naming the key, the value and the fix.

The schema is OmegaConf structured configs. The top level and the groups this package reads itself (sched,
callbacks, paths) are dataclasses written here. The others are made from what they configure: a `_target_` node
(data, model, optim, trainer, each logger) from its target's parameters, `sparsity` from the config class of its
pattern, `prune_schedule` from PruneSchedule. So every Lightning Trainer argument is a valid `trainer.X` and a
misspelt one is caught, with no list of them kept here.
"""
import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sparsetrain.sparse.config import CONFIG_BY_PATTERN, config_from_dict
from sparsetrain.sparse.schedules import PruneSchedule
from sparsetrain.training.compile import COMPILE_MODES
from sparsetrain.training.errors import ConfigError
from sparsetrain.training.lr import SCHEDULES

PATTERNS = (*CONFIG_BY_PATTERN, "dense")
# The keys hydra.utils.instantiate reads from a `_target_` node itself.
INSTANTIATE_KEYS = {"_target_": str, "_partial_": bool, "_recursive_": bool, "_convert_": str, "_args_": list}
# Logger keys that sparsetrain reads itself before instantiating (loggers.py): wandb's offline=null means
# "offline unless wandb credentials exist".
LOGGER_KEYS = {"wandb": {"offline": Optional[bool]}}
_PRIMITIVES = (bool, int, float, str)


def one_of(name: str, values) -> type[Enum]:
    """An Enum whose members are `values`, so OmegaConf accepts exactly those strings."""
    return Enum(name, {value: value for value in values})


Schedule = one_of("Schedule", SCHEDULES)
Mode = one_of("Mode", ("max", "min"))
Pattern = one_of("Pattern", PATTERNS)
NonFinite = one_of("NonFinite", ("skip", "stop"))
CompileMode = one_of("CompileMode", COMPILE_MODES)


@dataclass
class SchedConfig:
    """conf/sched/: the learning-rate schedule (sparsetrain.training.lr)."""

    name: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class CheckpointConfig:
    every_n_train_steps: Optional[int] = 500
    every_n_epochs: Optional[int] = None
    save_top_k: int = 1
    monitor: str = "val/acc"
    mode: Mode = "max"


@dataclass
class CallbacksConfig:
    """conf/callbacks/default.yaml."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sparsity_log_every: int = 50
    bn_recalibration_batches: int = 20
    progress_every_n_steps: int = 50


@dataclass
class PathsConfig:
    root: str = "runs"
    run_dir: str = MISSING


@dataclass
class SparsityTrainingConfig:
    """The `sparsity` keys the training glue reads beside the pattern's own config class."""

    pattern: Pattern = "dense"
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    masked_decay: float = 0.0
    score_lr_scale: float = 1.0
    subnet_levels: Optional[list[float]] = None
    subnet_weights: Optional[list[float]] = None


@dataclass
class TrainConfig:
    """conf/train.yaml's own keys; each group is checked against its own schema (group_schemas)."""

    seed: int = 0
    recipe_name: Optional[str] = None
    run_name: str = "default"
    resume: Optional[str] = None
    force_resume: bool = False
    label_smoothing: float = 0.0
    nonfinite: NonFinite = "stop"
    compile: Optional[CompileMode] = None
    cuda_graph: Any = False
    objective: str = "val/acc"
    requires_gpu: bool = False
    allow_cpu: bool = False
    sched: SchedConfig = field(default_factory=SchedConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: Any = None
    model: Any = None
    optim: Any = None
    trainer: Any = None
    logger: Any = None
    sparsity: Any = None
    prune_schedule: Any = None


@dataclass(frozen=True)
class Bound:
    """An interval a number must lie in; `example` is a value the message suggests."""

    low: float
    example: str
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The ranges types cannot say. A key that is absent or null passes; a list must hold only values in range.
BOUNDS = {
    "label_smoothing": Bound(0, "0.1", high=1),
    "data.batch_size": Bound(1, "64"),
    "data.num_workers": Bound(0, "2"),
    "data.img_size": Bound(1, "32"),
    "data.subset": Bound(1, "1000"),
    "data.train_size": Bound(1, "2048"),
    "data.val_size": Bound(1, "512"),
    "data.val_fraction": Bound(0, "0.1", high=1),
    "data.noise_std": Bound(0, "1.0"),
    "optim.lr": Bound(0, "1e-3", low_open=True),
    "optim.weight_decay": Bound(0, "0.05"),
    "optim.momentum": Bound(0, "0.9"),
    "trainer.max_steps": Bound(-1, "1000 (-1: no limit)"),
    "trainer.max_epochs": Bound(-1, "10 (-1: no limit)"),
    "trainer.num_nodes": Bound(1, "1"),
    "trainer.accumulate_grad_batches": Bound(1, "2"),
    "trainer.check_val_every_n_epoch": Bound(1, "1"),
    "trainer.log_every_n_steps": Bound(1, "10"),
    "trainer.gradient_clip_val": Bound(0, "1.0"),
    "sched.warmup_steps": Bound(0, "100"),
    "sched.min_lr_ratio": Bound(0, "0.01", high=1, high_open=False),
    "sparsity.masked_decay": Bound(0, "0.5"),
    "sparsity.score_lr_scale": Bound(0, "1.0", low_open=True),
    "sparsity.subnet_levels": Bound(0, "[0.9,0.8,0.5]", high=1),
    "sparsity.subnet_weights": Bound(0, "[1.0,1.0,1.0]"),
    "prune_schedule.dense_warmup_steps": Bound(0, "100"),
    "prune_schedule.update_every": Bound(1, "1"),
    "prune_schedule.dense_final_fraction": Bound(0, "0.3", high=1),
    "prune_schedule.end_fraction": Bound(0, "0.3", high=1, low_open=True, high_open=False),
    "callbacks.sparsity_log_every": Bound(1, "50"),
    "callbacks.bn_recalibration_batches": Bound(0, "20"),
    "callbacks.progress_every_n_steps": Bound(1, "50"),
    "callbacks.checkpoint.every_n_train_steps": Bound(1, "500"),
    "callbacks.checkpoint.save_top_k": Bound(-1, "1 (-1: all)"),
}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for an unknown key, a value of the wrong type or out of range (one line, with the fix)."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # e.g. an interpolation naming a key that does not exist
        raise ConfigError(f"{e.full_key}: {_first_line(e.msg)}") from None
    values.pop("hydra", None)
    _check(TrainConfig, values, "", owner="the config")
    for group, (schema, owner) in group_schemas(values).items():
        node = _lookup(values, group)
        if isinstance(node, dict):
            _check(schema, node, f"{group}.", owner)
        elif node is not None:
            raise ConfigError(f"{group}={node} must be a config node; pick an option of the {group} group instead")
    _check_sparsity_config(values.get("sparsity") or {})
    for key, bound in BOUNDS.items():
        _check_bound(key, _lookup(values, key), bound)


def group_schemas(values: dict) -> dict[str, tuple[type, str]]:
    """{group key: (its schema, what the message calls its owner)} for the groups not typed in TrainConfig."""
    schemas = {group: target_schema(values[group], group) for group in ("data", "model", "optim", "trainer")
               if isinstance(values.get(group), dict)}
    for name, node in (values.get("logger") or {}).items():
        schemas[f"logger.{name}"] = target_schema(node, f"logger.{name}", LOGGER_KEYS.get(name))
    if isinstance(values.get("sparsity"), dict):
        schemas["sparsity"] = sparsity_schema(values["sparsity"])
    schemas["prune_schedule"] = (schema_of("PruneScheduleConfig", PruneSchedule, skip=("pattern",),
                                           extra={"finetune_steps": Optional[int], "finetune_epochs": Optional[float]}),
                                 "prune_schedule")
    return schemas


def target_schema(node, where: str, own_keys: Optional[dict] = None) -> tuple[type, str]:
    """The schema of a `_target_` node: the target's parameters, or (**kwargs) any key beside them too; `own_keys`
    are read by sparsetrain itself, with its own types."""
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{where} needs a _target_ (the class or function it builds); pick an option of its group")
    target = node["_target_"]
    try:
        obj = locate(target)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}._target_={target} cannot be imported ({e}); check its spelling") from None
    return schema_of(f"{where}:{target}", obj, extra={**INSTANTIATE_KEYS, **(own_keys or {})}), target


def locate(path: str):
    """The object a dotted path names, as hydra.utils.instantiate finds it (pkg.module.Class[.attribute])."""
    module_path, attributes = path, []
    while module_path:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as e:
            if e.name != module_path:  # the module exists but needs one that is missing
                raise
            module_path, _, attribute = module_path.rpartition(".")
            attributes.insert(0, attribute)
            continue
        for attribute in attributes:
            module = getattr(module, attribute)
        return module
    raise ImportError(f"no module named {path.split('.')[0]!r}")


def sparsity_schema(node: dict) -> tuple[type, str]:
    """The `sparsity` keys of its pattern: the pattern's config class, plus what the training glue reads."""
    pattern = node.get("pattern")
    if pattern not in PATTERNS:
        raise ConfigError(f"sparsity.pattern={pattern} must be one of {', '.join(PATTERNS)}; pick it with "
                          f"sparsity=<option>")
    if pattern == "dense":
        return SparsityTrainingConfig, "sparsity (pattern dense)"
    schema = schema_of(f"sparsity:{pattern}", CONFIG_BY_PATTERN[pattern], base=SparsityTrainingConfig)
    return schema, f"sparsity (pattern {pattern})"


def schema_of(name: str, obj, skip=(), extra=None, base=None) -> type:
    """A dataclass with a field per parameter of `obj` (typed as far as OmegaConf can check it) and per `extra`
    (which wins over a parameter of its name). A `**kwargs` parameter makes it open: keys beyond its fields are
    not checked."""
    extra = extra or {}
    fields, is_open = [], False
    for parameter in _parameters(obj):
        if parameter.kind == parameter.VAR_KEYWORD:
            is_open = True
        elif parameter.kind != parameter.VAR_POSITIONAL and parameter.name not in (*skip, *extra):
            example = parameter.default if isinstance(parameter.default, _PRIMITIVES) else None
            metadata = {"example": example, "choices": literal_values(parameter.annotation)}
            kind = config_type(parameter.annotation)
            fields.append((parameter.name, kind, field(default=MISSING, metadata=metadata)))
    fields += [(key, config_type(kind), field(default=MISSING)) for key, kind in extra.items()]
    schema = make_dataclass(name, fields, bases=(base,) if base else ())
    schema.is_open = is_open
    return schema


def _parameters(obj) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(obj, eval_str=True).parameters.values())
    except NameError:  # an annotation names a type imported for type checkers only: check names, not types
        return list(inspect.signature(obj).parameters.values())


def config_type(annotation) -> Any:
    """What OmegaConf can check of a parameter's annotation: a primitive, an optional one or a list of them.
    Anything else is Any: OmegaConf has no other unions, and a Tensor or a class cannot come from YAML anyway."""
    if annotation in _PRIMITIVES:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is list or origin in (list, tuple, collections.abc.Sequence):
        item = config_type(args[0]) if args and (len(args) == 1 or args[1] is Ellipsis) else Any
        return list[item]
    if origin in (typing.Union, types.UnionType):
        members = {arg for arg in args if arg is not type(None)}
        base = float if members == {int, float} else next(iter(members)) if len(members) == 1 else None
        if base in _PRIMITIVES:
            return Optional[base] if type(None) in args else base
    return Any


def literal_values(annotation) -> Optional[tuple]:
    """The values an annotation made of Literals (and bool, None) allows, or None when it is not such a set."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if annotation is bool:
        return True, False
    if annotation is type(None):
        return (None,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [literal_values(arg) for arg in typing.get_args(annotation)]
        if any(member is None for member in members):
            return None
        return tuple(dict.fromkeys(value for member in members for value in member))
    return None


def _check(schema: type, node: dict, prefix: str, owner: str) -> None:
    checked = node
    if getattr(schema, "is_open", False):
        known = {f.name for f in dataclasses.fields(schema)}
        checked = {key: value for key, value in node.items() if key in known}
    try:
        OmegaConf.merge(OmegaConf.structured(schema), checked)
    except ConfigKeyError as e:
        parent = e.full_key.rpartition(".")[0]
        key = f"{prefix}{e.full_key}"
        known = [f.name for f in dataclasses.fields(_field(schema, parent).type if parent else schema)]
        raise ConfigError(unknown_key_message(key, f"{key}={_show(_lookup(node, e.full_key))}", known,
                                              f"{prefix}{parent}" if parent else owner)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(_type_message(schema, prefix, e)) from None
    for field_ in dataclasses.fields(schema):
        choices = field_.metadata.get("choices")
        if field_.name in node and choices is not None and node[field_.name] not in choices:
            raise ConfigError(f"{prefix}{field_.name}={_show(node[field_.name])} must be one of "
                              f"{', '.join(dict.fromkeys(map(_show, choices)))}")


def unknown_key_message(key: str, shown: str, known, owner: str) -> str:
    """`key` (given as `shown`, e.g. key=value) is not a setting of `owner`: the closest of `known` as the fix,
    or the list of them."""
    parent, _, leaf = key.rpartition(".")
    known = sorted({k for k in known if not k.startswith("_")})
    close = difflib.get_close_matches(leaf, known, n=1)
    fix = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else \
        f"remove it (the settings: {', '.join(known)})"
    return f"{shown} is not a setting of {owner}; {fix}"


def _type_message(schema: type, prefix: str, e: OmegaConfBaseException) -> str:
    path = e.full_key.split("[")[0]
    field_ = _field(schema, path)
    key = f"{prefix}{path}"
    if field_ is None:
        return f"{prefix}{e.full_key}={_show(e.value)}: {_first_line(e.msg)}"
    expected = _describe(field_.type)
    example = field_.metadata.get("example", field_.default)
    suggest = (isinstance(example, _PRIMITIVES) and not isinstance(example, bool) and example != MISSING
               and "one of" not in expected)
    fix = f", e.g. {key}={_show(example)}" if suggest else ""
    return f"{key}={_show(e.value)} must be {expected}{fix}"


def _field(schema: type, dotted: str) -> Optional[dataclasses.Field]:
    found = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(schema):
            return None
        found = {f.name: f for f in dataclasses.fields(schema)}.get(part)
        if found is None:
            return None
        schema = found.type
    return found


def _describe(kind) -> str:
    args = typing.get_args(kind)
    if type(None) in args:
        return f"null or {_describe(next(a for a in args if a is not type(None)))}"
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "one of " + ", ".join(kind.__members__)
    if typing.get_origin(kind) is list:
        items = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(args[0])
        return f"a list of {items}" if items else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "something else")


def pattern_options(sparsity: dict) -> dict:
    """The `sparsity` keys that configure the pattern itself (config_from_dict), without the training glue's."""
    glue = {f.name for f in dataclasses.fields(SparsityTrainingConfig)} - {"pattern"}
    return {key: value for key, value in sparsity.items() if key not in glue}


def _check_sparsity_config(node: dict) -> None:
    """The pattern's config class checks its own values (choices, ranges, combinations)."""
    try:
        config_from_dict(pattern_options(node))
    except ValueError as e:
        raise ConfigError(f"sparsity.{e}") from None


def _check_bound(key: str, value, bound: Bound) -> None:
    if value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"{key}={_show(value)} must be a number {bound}, e.g. {key}={bound.example}")
        if not bound.holds(item):
            where = f"{key} has {_show(item)}, which" if isinstance(value, list) else f"{key}={_show(value)}"
            raise ConfigError(f"{where} must be {bound}, e.g. {key}={bound.example}")


def _lookup(values: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(values, dict):
            return None
        values = values.get(part)
    return values


def _show(value) -> str:
    """A value as the user types it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(_show, value)) + "]"
    return str(value)


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""
