"""Recipes to and from JSON, and back from built objects to the recipe that made them.

A Trainer built with `fdl.build(cfg)` (or by hand) records the recipe it was built from by turning
its arguments back into a config: functools.partial becomes fdl.Partial and a dataclass becomes
fdl.Config. That recipe is saved as JSON beside every checkpoint, so a checkpoint loads without
the recipe's source file.

Loading a recipe JSON runs no code from it: a recipe names the functions and classes it builds,
and importing or calling an attacker's choice of them is running their code. So `from_json` reads
the names first and refuses, before importing anything, every one that is not a public name of the
packages recipes build from (RECIPE_MODULES: the modules, data sources, objectives, optimizer,
trainer, sharding and rewards) or one of the few container types fiddle writes itself; once
imported, each must be a class (or a reward function): a public *function* of nnxlm could do what
its caller asks, e.g. write a file. A run directory, checkpoint or recipe JSON
from someone else can thus be inspected, decoded and converted safely; `trust_recipe_code()` (the
command line's --trust_recipe_code) lifts the restriction for recipes whose source you trust.
"""

import dataclasses
import functools
import json
import re
import types

import fiddle as fdl
from fiddle._src.config import BuildableTraverserMetadata
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


# The names outside nnxlm that nnxlm's own recipes contain: the containers and config classes
# fiddle writes for every recipe (a tuple of LoRA targets, a dict of arguments, fdl.Config and
# fdl.Partial). They hold data and run nothing of the recipe's choosing.
ALLOWED = {
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("fiddle._src.config", "Config"): fdl.Config,
    ("fiddle._src.partial", "Partial"): fdl.Partial,
    ("fiddle._src.config", "BuildableTraverserMetadata"): BuildableTraverserMetadata,
}
# nnxlm modules that import, execute or load other code (recipe files, the command line, a
# trusted JSON load, a process restart): a recipe naming them could run anything.
RUNS_CODE = ("nnxlm.cli", "nnxlm.launch", "nnxlm.recipes.directives", "nnxlm.recipes.serialization")
# what recipes are built from: their classes (and nnxlm.rewards' functions, which score completions)
RECIPE_MODULES = (
    "nnxlm.modules",
    "nnxlm.data",
    "nnxlm.objectives",
    "nnxlm.optim",
    "nnxlm.trainer",
    "nnxlm.sharding",
    "nnxlm.rewards",
)
FUNCTIONS_ALLOWED = ("nnxlm.rewards",)
_PUBLIC_DOTTED = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")
_trusted = False


class trust_recipe_code:
    """Lets recipe JSON name any importable callable, as fiddle itself would (transformers'
    trust_remote_code): `trust_recipe_code()` for the rest of the process, or
    `with trust_recipe_code():` for a block. Only for recipes whose source you trust."""

    def __init__(self, enabled: bool = True):
        global _trusted
        self._previous, _trusted = _trusted, bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        global _trusted
        _trusted = self._previous


def from_json(data: dict | str, trust: bool | None = None) -> fdl.Buildable:
    """The recipe saved as JSON by to_json. Unless trusted (trust, else trust_recipe_code), every
    module and name it references is checked before anything is imported (see the module docstring);
    the first one refused raises UserError naming it. JSON that is no fiddle recipe raises ValueError."""
    text = data if isinstance(data, str) else json.dumps(data)
    tree = json.loads(text)
    if not (isinstance(tree, dict) and {"root", "objects"} <= tree.keys()):
        raise ValueError("the JSON is not a fiddle recipe (it has no root and objects)")
    trusted = _trusted if trust is None else trust
    if not trusted:
        for module, name in _references(tree):
            _check_name(module, name)
    policy = _Trusted() if trusted else _NnxlmOnly()
    try:
        return serialization.load_json(text, pyref_policy=policy)
    except (KeyError, IndexError, TypeError, serialization.DeserializationError) as e:  # malformed structure
        raise ValueError(f"the JSON is not a fiddle recipe ({type(e).__name__}: {e})") from None
    except serialization.PyrefPolicyError as e:  # a public nnxlm name that resolves elsewhere
        if trusted:  # fiddle's own policy: a built-in function such as eval
            raise UserError(f"recipe JSON names {e.module}.{e.symbol}, a built-in that fiddle never loads") from None
        raise _refused(f"{e.module}.{e.symbol}", policy.why) from None
    except (ImportError, AttributeError) as e:  # fiddle appends a second line of context: left out
        module, name = policy.last
        raise UserError(
            f"recipe JSON names {module}.{name}, which cannot be imported here ({str(e).splitlines()[0]}): "
            "it needs another version of nnxlm, or a package this Python lacks"
        ) from None


def _references(node):
    """(module, name) of every Python reference ("pyref") anywhere in a fiddle JSON tree."""
    if isinstance(node, dict):
        if node.get("type") == "pyref":
            module, name = node.get("module"), node.get("name")
            if not (isinstance(module, str) and isinstance(name, str)):
                raise UserError(f"recipe JSON has a malformed Python reference {node!r}: it was not written by nnxlm")
            yield module, name
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def _refused(what: str, why: str) -> UserError:
    return UserError(
        f"recipe JSON names {what}, which {why}: refused (pass --trust_recipe_code, or use "
        "nnxlm.recipes.serialization.trust_recipe_code(), if you trust where it came from)"
    )


def _in_nnxlm(module: str) -> bool:
    return module == "nnxlm" or module.startswith("nnxlm.")


def _check_name(module: str, name: str) -> None:
    """Refuses, before any import, a reference outside nnxlm's public names and ALLOWED (a private
    name could reach further: nnxlm.__main__ runs the command line when imported)."""
    if (module, name) in ALLOWED:
        return
    what = f"{module}.{name}"
    if not _in_nnxlm(module):
        raise _refused(what, "is not part of nnxlm")
    if not (_PUBLIC_DOTTED.fullmatch(module) and _PUBLIC_DOTTED.fullmatch(name)):
        raise _refused(what, "is not a public name of nnxlm")
    if _within(module, RUNS_CODE):
        raise _refused(what, "loads or runs other code")
    if not _within(module, RECIPE_MODULES):
        raise _refused(what, f"is outside the packages recipes are built from ({', '.join(RECIPE_MODULES)})")


def _within(module: str, packages) -> bool:
    return any(module == m or module.startswith(m + ".") for m in packages)


class _Trusted(serialization.DefaultPyrefPolicy):
    """fiddle's own policy, remembering the reference being imported for error messages."""

    last = ("?", "?")

    def allows_import(self, module: str, symbol: str) -> bool:
        self.last = (module, symbol)
        return super().allows_import(module, symbol)


class _NnxlmOnly(_Trusted):
    """fiddle's check at each import: the names _check_name allows, and what they resolve to must be
    defined in nnxlm itself (nnxlm.trainer.os.system is os.system)."""

    why = "is not part of nnxlm"

    def allows_import(self, module: str, symbol: str) -> bool:
        _check_name(module, symbol)
        return super().allows_import(module, symbol)

    def allows_value(self, value) -> bool:
        if any(value is allowed for allowed in ALLOWED.values()):
            return True
        module = getattr(value, "__module__", None)
        if isinstance(value, types.ModuleType):
            self.why = "is a module, not a function or class"
            return False
        if not (isinstance(module, str) and _in_nnxlm(module)):
            return False
        if _within(module, RUNS_CODE):
            self.why = "loads or runs other code"
            return False
        if not (isinstance(value, type) or _within(module, FUNCTIONS_ALLOWED)):
            self.why = "is a function, and a recipe builds classes only (and nnxlm.rewards' functions)"
            return False
        return True
