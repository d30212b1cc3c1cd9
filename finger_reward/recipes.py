"""Settings dataclasses from flat YAML files and command lines, the way HF/TRL argument dataclasses load.

Every recipe and config of the project (`ServeConfig`, the trainers' recipes) is one dataclass whose
fields are the keys of its YAML file; `--config FILE --field value` on the command line (TRL's
`TrlParser`) sets them, flags winning over the file.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def read_yaml_fields(cls: type, path: str | Path, allowed: tuple[str, ...] = ()) -> dict:
    """The flat mapping in a YAML file; a key that is not a field of `cls` (or `allowed`) is an error naming the
    valid ones."""
    import yaml

    values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a flat mapping of {cls.__name__} fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)} | set(allowed)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return values


def from_yaml(cls: type[T], path: str | Path | None = None, **overrides) -> T:
    """`cls` from a YAML file's fields (none if `path` is None), then `overrides`, which win."""
    values = read_yaml_fields(cls, path) if path is not None else {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} of {cls.__name__}; valid keys: {', '.join(sorted(known))}")
    return cls(**{**values, **overrides})


def parse_recipe(cls: type[T], argv: list[str] | None = None) -> T:
    """`cls` from `--config FILE` (optional) and `--field value` flags, which win; TRL's parser, as its scripts use."""
    from trl import TrlParser

    argv = list(argv) if argv is not None else sys.argv[1:]
    if "--config" in argv[:-1]:  # TRL's own message would not name the valid keys
        read_yaml_fields(cls, argv[argv.index("--config") + 1], allowed=("env",))
    (recipe,) = TrlParser([cls]).parse_args_and_config(argv)
    return recipe


def undo_yaml_coercion(recipe) -> None:
    """YAML 1.1 reads `1e-4` (no dot) as a string and a bare `no` as false: give float and int fields their
    numbers, and str fields their words back (`mixed_precision: no`), in place."""
    for f in dataclasses.fields(recipe):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None)
        value = getattr(recipe, f.name)
        if kind == "str" and isinstance(value, bool):
            setattr(recipe, f.name, "yes" if value else "no")
        elif kind in ("float", "int") and isinstance(value, str):
            try:
                setattr(recipe, f.name, float(value) if kind == "float" else int(value))
            except ValueError:
                raise ValueError(f"{f.name} must be {'a number' if kind == 'float' else 'an integer'}, "
                                 f"got {value!r}") from None
