"""The command line of `distill` and `finetune`: Hugging Face's ``HfArgumentParser`` over the commands'
dataclasses (so every ``TrainingArguments`` flag works), plus ``--config FILE.yaml`` holding any of the
same keys. The command line wins over the file, the file over the defaults.

Two things differ from a plain ``HfArgumentParser``: a list option is repeated (``--teacher small=A
--teacher large=B``, as ``torchrun`` job specs write it) rather than given several values at once,
and every problem with the YAML file is one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from shared.config_file import read_yaml_mapping
from shared.errors import UserError

ArgumentsT = TypeVar("ArgumentsT", bound="CommandArguments")


class CommandArguments:
    """A command's options: one object over its parts (dataclasses), an attribute looked up in each
    part in turn, so ``args.learning_rate`` and ``args.teacher`` read the same way."""

    PARTS: ClassVar[tuple[type, ...]] = ()

    def __init__(self, **values: Any) -> None:
        parts = []
        for cls in self.PARTS:
            mine = {name: values.pop(name) for name in field_names(cls) & set(values)}
            try:
                parts.append(cls(**mine))
            except ValueError as err:  # TrainingArguments' own checks: one line
                raise UserError(" ".join(str(err).split())) from None
        if values:
            raise TypeError(f"{type(self).__name__} has no option {sorted(values)[0]!r}")
        self.parts = tuple(parts)

    def __getattr__(self, name: str) -> Any:
        for part in self.__dict__.get("parts", ()):
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def part(self, cls: type[Any]) -> Any:
        return next(part for part in self.parts if isinstance(part, cls))

    def to_dict(self) -> dict[str, Any]:
        """Every option by name (the ``TrainingArguments`` as their own ``to_dict`` writes them)."""
        values: dict[str, Any] = {}
        for part in self.parts:
            values.update(part.to_dict() if hasattr(part, "to_dict") else dataclasses.asdict(part))
        return values

    def validate(self: ArgumentsT) -> ArgumentsT:
        return self


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


class CommandParser(HfArgumentParser):
    """``HfArgumentParser`` with repeated list options and ``--config FILE.yaml``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__([], **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """One line (the usage of every ``TrainingArguments`` flag is hundreds): ``--help`` shows them."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_options(self, arguments: type[CommandArguments]) -> None:
        self.add_argument(
            "--config", metavar="FILE.yaml", help="YAML file with any of these options as keys."
        )
        for cls in arguments.PARTS:
            self._add_dataclass_arguments(cls)
            self.dataclass_types.append(cls)

    @staticmethod
    def _parse_dataclass_field(parser: Any, field: dataclasses.Field) -> None:
        if typing.get_origin(field.type) is list and field.default_factory is not dataclasses.MISSING:
            parser.add_argument(
                f"--{field.name}",
                action="append",
                type=typing.get_args(field.type)[0],
                default=field.default_factory(),  # type: ignore[misc]
                help=field.metadata.get("help"),
            )
            return
        HfArgumentParser._parse_dataclass_field(parser, field)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """The YAML file's values become the defaults the flags then override."""
        args = list(args or [])
        config = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), None)
        config = config or next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
        if config and self.dataclass_types:  # a command of ours (not `experiment`, whose --config is its own)
            self.set_defaults(**self.yaml_defaults(Path(config)))
        return super().parse_known_args(args, namespace)

    def yaml_defaults(self, path: Path) -> dict[str, Any]:
        values = {}
        for key, value in read_yaml_mapping(path, "of option names to values").items():
            action = self._option_string_actions.get(f"--{key}")
            if action is None or key == "config" or action.dest == "help":
                raise UserError(f"{path}: unknown key {key!r} (keys are the command's option names)")
            values[action.dest] = yaml_value(path, str(key), value, action)
        return values

    def arguments(self, namespace: argparse.Namespace, cls: type[ArgumentsT]) -> ArgumentsT:
        names = set().union(*(field_names(part) for part in cls.PARTS))
        return cls(**{k: v for k, v in vars(namespace).items() if k in names}).validate()


def yaml_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    """One YAML value checked against its flag's type and choices (YAML already typed it)."""
    kind = bool if action.type is string_to_bool else action.type or str
    is_list = isinstance(action, argparse._AppendAction) or action.nargs == "+"
    name = getattr(kind, "__name__", "a value")
    if value is None:  # `key:` with nothing after it
        if action.default is None:
            return None
        raise UserError(
            f"{path}: key {key!r} has no value; it must be {'a list of ' if is_list else ''}{name}"
        )
    if key == "teacher" and isinstance(value, dict):  # teacher: {small: SPEC, large: SPEC}
        return [f"{role}={yaml_scalar(path, key, spec, str)}" for role, spec in value.items()]
    if is_list:
        return [
            yaml_scalar(path, key, v, kind, action.choices)
            for v in (value if isinstance(value, list) else [value])
        ]
    return yaml_scalar(path, key, value, kind, action.choices)


def yaml_scalar(path: Path, key: str, value: Any, kind: Any, choices: Any = None) -> Any:
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML reads 5e-5 as a string
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind in (bool, int, float, str):
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise UserError(f"{path}: key {key!r} must be {kind.__name__}, got {value!r}")
    else:  # a choice or another converter of the flag's
        try:
            value = kind(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise UserError(f"{path}: key {key!r} cannot be {value!r}") from None
    if choices and value not in choices:
        raise UserError(f"{path}: --{key} must be one of {list(choices)}, got {value!r}")
    return value
