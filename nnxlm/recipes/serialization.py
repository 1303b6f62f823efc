"""Recipes to and from JSON, and back from built objects to the recipe that made them.

A Trainer built with `fdl.build(cfg)` (or by hand) records the recipe it was built from by turning
its arguments back into a config: functools.partial becomes fdl.Partial and a dataclass becomes
fdl.Config. That recipe is saved as JSON beside every checkpoint, so a checkpoint loads without
the recipe's source file.
"""

import dataclasses
import functools
import json

import fiddle as fdl
from fiddle.experimental import serialization

from nnxlm.errors import UserError


def as_config(value):
    """The fiddle config that builds `value` (partials, dataclasses, containers, plain values)."""
    if isinstance(value, functools.partial):
        if value.args:
            raise ValueError(f"cannot record positional arguments of {value!r} in a recipe; use keywords")
        return fdl.Partial(value.func, **{k: as_config(v) for k, v in value.keywords.items()})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: as_config(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return fdl.Config(type(value), **fields)
    if isinstance(value, (list, tuple)):
        return type(value)(as_config(v) for v in value)
    if isinstance(value, dict):
        return {k: as_config(v) for k, v in value.items()}
    return value


def to_json(cfg: fdl.Buildable) -> dict:
    try:
        return json.loads(serialization.dump_json(cfg))
    except Exception as e:  # fiddle raises several types for unserializable values
        raise UserError(
            f"the recipe cannot be saved as JSON ({e}); recipe pieces must be importable "
            "functions and classes, not lambdas or objects defined in __main__"
        ) from e


def from_json(data: dict | str) -> fdl.Buildable:
    return serialization.load_json(data if isinstance(data, str) else json.dumps(data))
