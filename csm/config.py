"""Stage configuration: dataclass defaults, then a YAML file, then ``--key value`` overrides.

Every stage (fit-diffusion, generate, annotate, train, evaluate, ...) is configured by one
dataclass. :func:`resolve_config` fills it in three layers, later layers winning:

1. the dataclass defaults;
2. a YAML file (``--config FILE``) holding a mapping of field names to values;
3. explicit overrides (``--key value`` on the command line, or a dict from Python).

Values are coerced to the field's annotated type (``int``, ``float``, ``str``, ``bool``,
``X | None``, ``list[X]``) and unknown keys are rejected with a :class:`~csm.errors.CSMError`.
The resolved configuration is written next to every output as ``config.yaml``
(:func:`save_config`), so each result records exactly how it was made. No Hydra.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo:
    ...     steps: int = 25
    >>> resolve_config(Demo, overrides={"steps": "10"}).steps
    10
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from csm.errors import CSMError
from csm.utils import atomic_write_text

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass (handles ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Split ``X | None`` into ``(X, True)``; other types give ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (a YAML scalar or a command-line string) to the annotated type ``tp``.

    Args:
        value: The raw value.
        tp: The field's type annotation.
        name: The field name, used in error messages.

    Raises:
        CSMError: If the value cannot be converted.
    """
    inner, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional or inner is Any:
            return None
        raise CSMError(f"--{name.replace('_', '-')}: a value is required; give a {inner.__name__}")
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, item_tp, name) for v in value]
    if inner is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise CSMError(f"--{name.replace('_', '-')}: {value!r} is not a boolean; use true or false")
    if inner in (int, float, str):
        if inner is int and isinstance(value, float) and not value.is_integer():
            raise CSMError(
                f"--{name.replace('_', '-')}: {value!r} is not an integer; give a whole number"
            )
        try:
            return inner(value)
        except (TypeError, ValueError):
            raise CSMError(
                f"--{name.replace('_', '-')}: {value!r} is not a valid {inner.__name__}; "
                f"give a {inner.__name__}"
            ) from None
    return value


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise CSMError(f"--config {path}: file not found; give the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise CSMError(f"--config {path}: invalid YAML{line}; fix the syntax") from None
    if not isinstance(data, dict):
        raise CSMError(f"--config {path}: expected a mapping of option names to values")
    return data


def resolve_config(
    cls: type[T],
    config_path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Build a config: dataclass defaults, then the YAML file, then ``overrides``.

    Args:
        cls: The stage's config dataclass.
        config_path: Optional YAML file with a mapping of field names to values.
        overrides: Optional mapping of field names (``-`` or ``_``) to values.

    Returns:
        An instance of ``cls`` with every value coerced to its annotated type.

    Raises:
        CSMError: On an unknown key, a value of the wrong type or an unreadable file.
    """
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_path is not None:
        layers.append((f"--config {config_path}", load_yaml(config_path)))
    if overrides:
        layers.append(("override", overrides))
    for source, layer in layers:
        for key, value in layer.items():
            name = str(key).replace("-", "_")
            if name not in types_:
                known = ", ".join(sorted(types_))
                raise CSMError(f"{source}: unknown option {key!r}; known options: {known}")
            values[name] = coerce(value, types_[name], name)
    try:
        cfg = cls(**values)
    except TypeError as exc:  # a required field without default
        raise CSMError(f"{cls.__name__}: {exc}; give the missing option") from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (paths become strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config as ``out_dir/config.yaml`` (atomically) and return its path."""
    path = Path(out_dir) / name
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)
    return path


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    """Reload a config written by :func:`save_config` (unknown keys are an error)."""
    return resolve_config(cls, overrides=load_yaml(path))


def field_help(f: dataclasses.Field) -> str:
    """The one-line help text stored in a field's ``metadata['help']`` (may be empty)."""
    return str(f.metadata.get("help", ""))
