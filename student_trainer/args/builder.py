"""One builder from an options dataclass to its command line and YAML file.

Every field of the dataclass is a flag of the same name (``option()`` carries its help and
allowed values); the same keys work in a YAML file given with ``--config``. The command line
wins over the file, the file over the defaults. One declaration drives the parser (with
``choices``), the YAML checks and the validation, so a flag can never exist in one and not the
other, and a value outside the choices is refused before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from shared.config_file import read_yaml_mapping
from shared.errors import UserError


class Options(Protocol):
    """An options dataclass: ``validate()`` fills what can be inferred and refuses contradictions."""

    def validate(self) -> Any: ...


OptionsT = TypeVar("OptionsT", bound=Options)


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its command-line help (and allowed values)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_choices(options: object) -> None:
    """Refuse a value outside a field's ``choices`` (a YAML file or a caller may bypass argparse)."""
    for f in dataclasses.fields(options):  # type: ignore[arg-type]
        value, choices = getattr(options, f.name), f.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise UserError(f"--{f.name} must be one of {list(choices)}, got {value!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_list(cls: type, name: str) -> bool:
    return typing.get_origin(_hints(cls)[name]) is list


def _base_type(cls: type, name: str) -> type:
    """``int | None`` -> int, ``list[str]`` -> str: the type one value of field ``name`` has."""
    hint = _hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if _is_list(cls, name):
        hint = typing.get_args(hint)[0]
    return hint


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field. Defaults are left out (SUPPRESS) so YAML values can sit under the CLI."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these keys.")
    for f in dataclasses.fields(cls):
        kind = _base_type(cls, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif _is_list(cls, f.name):
            parser.add_argument(
                f"--{f.name}", action="append", type=kind, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                f"--{f.name}",
                type=kind,
                choices=f.metadata["choices"],
                default=argparse.SUPPRESS,
                help=help_text,
            )


def _coerce_yaml(cls: type, name: str, value: Any, source: Path) -> Any:
    """Check one YAML value against the field's type (YAML already typed it)."""
    kind = _base_type(cls, name)
    if value is None:  # `key:` with nothing after it
        if type(None) in typing.get_args(_hints(cls)[name]):
            return None
        wanted = f"a list of {kind.__name__}" if _is_list(cls, name) else kind.__name__
        raise UserError(f"{source}: key {name!r} has no value; it must be {wanted}")
    if name == "teacher" and isinstance(value, dict):  # teacher: {small: SPEC, large: SPEC}
        return [f"{role}={_coerce_yaml_scalar(name, spec, str, source)}" for role, spec in value.items()]
    if _is_list(cls, name):
        values = value if isinstance(value, list) else [value]
        return [_coerce_yaml_scalar(name, v, kind, source) for v in values]
    return _coerce_yaml_scalar(name, value, kind, source)


def _coerce_yaml_scalar(name: str, value: Any, kind: type, source: Path) -> Any:
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 5e-5 as a string
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{source}: key {name!r} must be {kind.__name__}, got {value!r}")
    return value


def load_yaml_config(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of option names to values, rejecting unknown keys by name."""
    path = Path(path)
    loaded = read_yaml_mapping(path, "of option names to values")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in loaded if k not in names)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (keys are the command's option names)")
    return {key: _coerce_yaml(cls, key, value, path) for key, value in loaded.items()}


def arguments_from_namespace(namespace: argparse.Namespace, cls: type[OptionsT]) -> OptionsT:
    """Defaults, then the YAML file, then the flags actually given; validated."""
    values: dict[str, Any] = {}
    config = getattr(namespace, "config", None)
    if config:
        values.update(load_yaml_config(config, cls))
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    return cls(**values).validate()


def parse_arguments(cls: type[OptionsT], argv: list[str], prog: str) -> OptionsT:
    """Parse one command's flags on their own (tests and scripts)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser, cls)
    return arguments_from_namespace(parser.parse_args(argv), cls)
