"""`--recipe` directives, applied in order:

    NAME                      a recipe function in nnxlm.recipes (tiny, llama3_8b, ...)
    path/to/file.py[:fn]      a recipe function in any file (default fn: the file's stem)
    path/to/recipe.json       a recipe saved as JSON (every run directory has recipe.json)
    fiddler:NAME(args)        an edit from nnxlm.recipes.fiddlers (or the recipe file, or a.b.fn)
    set:path.to.field=VALUE   VALUE is a Python literal: 3, 1e-3, 'bfloat16', [1, 2], None

Every mistake raises UserError with one line naming the directive and the fix; the resolved
recipe's values are then checked (nnxlm.recipes.validation) before anything runs.
"""

import ast
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import fiddle as fdl
from etils import epath

from nnxlm.errors import UserError


def resolve(directives: list[str]) -> fdl.Config:
    """The recipe described by a base directive followed by fiddlers and set: overrides."""
    if not directives:
        raise UserError("no recipe given: pass --recipe NAME or --recipe path/to/file.py[:fn]")
    base, *edits = directives
    if base.startswith(("set:", "fiddler:")):
        raise UserError(
            f"--recipe {base!r} comes first, but the first --recipe must name a recipe (NAME or file.py[:fn])"
        )
    cfg, module = load_base(base)
    for directive in edits:
        if directive.startswith("set:"):
            apply_set(cfg, directive)
        elif directive.startswith("fiddler:"):
            apply_fiddler(cfg, directive, module)
        else:
            raise UserError(f"--recipe {directive!r}: after the first, each --recipe must start with set: or fiddler:")
    from nnxlm.recipes.validation import check_recipe  # imported here: it imports the Trainer

    check_recipe(cfg)
    return cfg


def load_base(spec: str) -> tuple[fdl.Config, ModuleType]:
    """Calls the recipe function `spec` names; returns its config and its file's module (or None)."""
    from nnxlm import recipes

    if spec.endswith(".json"):
        return _load_json_recipe(spec), None
    path, _, function_name = spec.partition(":") if ".py" in spec else (spec, "", "")
    if path.endswith(".py"):
        module = _import_file(path)
        function_name = function_name or epath.Path(path).stem
        where = path
    else:
        module, function_name, where = None, spec, "nnxlm.recipes"
        if spec not in recipes.RECIPES:
            raise UserError(
                f"unknown recipe {spec!r}: choose one of {', '.join(recipes.RECIPES)} or give a file.py[:fn]"
            )
    function = getattr(module or recipes, function_name, None)
    if not callable(function):
        available = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(f"{where} has no recipe function {function_name!r}; it defines: {', '.join(available)}")
    cfg = function()
    if not isinstance(cfg, fdl.Buildable):
        raise UserError(f"recipe {spec!r} returned {type(cfg).__name__}, not a fiddle config: return fdl.Config(...)")
    if "name" in fdl.ordered_arguments(cfg, include_defaults=True) and "name" not in cfg.__arguments__:
        cfg.name = function_name  # the run directory defaults to runs/<recipe name>
    return cfg, module


def _load_json_recipe(path: str) -> fdl.Config:
    from nnxlm.recipes.serialization import from_json

    try:
        return from_json(epath.Path(path).read_text())  # a local path, gs://, ...
    except OSError as e:
        raise UserError(f"recipe file {path} cannot be read ({e.strerror}): check the path") from None
    except Exception as e:  # fiddle raises several types for a malformed recipe
        raise UserError(f"{path} is not an nnxlm recipe JSON ({type(e).__name__}: {e})") from None


def _import_file(path: str) -> ModuleType:
    # a recipe .py file is imported by this Python process, which reads local files only
    if not os.path.isfile(path):
        raise UserError(f"recipe file {path} does not exist: check the path (relative to {os.getcwd()})")
    name = "nnxlm_recipe_" + epath.Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"recipe file {path} failed to import ({type(e).__name__}: {e}); fix the file") from e
    return module


def _literal(text: str, directive: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(
            f"{directive!r}: {text!r} is not a Python literal; quote strings (set:a.b='text'), "
            "write numbers, True/False/None, lists or dicts"
        ) from None


def _walk(cfg, parts: list[str], directive: str):
    """The buildable (or container) holding the last part of a dotted path."""
    node = cfg
    for part in parts:
        node = _child(node, part, directive)
    return node


def _child(node, part: str, directive: str):
    if isinstance(node, fdl.Buildable):
        _check_argument(node, part, directive)
        return getattr(node, part)
    if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise UserError(f"{directive!r}: cannot go into {part!r} of {type(node).__name__} {node!r}; check the path")


def _check_argument(node: fdl.Buildable, part: str, directive: str) -> None:
    signature = node.__signature_info__
    if part not in signature.parameters and not signature.has_var_keyword:
        target = getattr(node.__fn_or_cls__, "__name__", node.__fn_or_cls__)
        names = ", ".join(n for n in signature.parameters if n != "rngs")
        raise UserError(f"{directive!r}: {target} has no field {part!r}; its fields are: {names}")


def apply_set(cfg: fdl.Config, directive: str) -> None:
    assignment = directive[len("set:") :]
    path, equals, text = assignment.partition("=")
    if not equals or not path:
        raise UserError(f"{directive!r} is not of the form set:path.to.field=VALUE")
    parts = path.strip().split(".")
    value = _literal(text.strip(), directive)
    parent = _walk(cfg, parts[:-1], directive)
    last = parts[-1]
    if isinstance(parent, fdl.Buildable):
        _check_argument(parent, last, directive)
        current = getattr(parent, last, None)
        _check_type(current, value, directive)
        setattr(parent, last, value)
    elif isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        parent[int(last)] = value
    else:
        raise UserError(f"{directive!r}: {'.'.join(parts[:-1]) or 'the recipe'} is not a config, dict or list")


def _check_type(current, value, directive: str) -> None:
    """Rejects a value of another kind than the field's current one (a string for a number, ...),
    and a literal in place of a part of the recipe (None only drops a part built as an object, such
    as eval_data; a part that is called later, such as the model, must stay)."""
    if isinstance(current, fdl.Partial) or (isinstance(current, fdl.Config) and value is not None):
        name = getattr(fdl.get_callable(current), "__name__", "?")
        raise UserError(
            f"{directive!r}: the field holds the recipe's {name} part, not a value: "
            f"set its fields instead (set:{directive[4:].partition('=')[0]}.FIELD=VALUE)"
        )
    if current is None or value is None or isinstance(current, fdl.Buildable):
        return
    if isinstance(current, bool) or isinstance(value, bool):
        same_kind = isinstance(current, bool) and isinstance(value, bool)
    elif isinstance(current, (int, float)) and isinstance(value, (int, float)):
        same_kind = True
    else:
        same_kind = isinstance(value, type(current)) or isinstance(current, type(value))
    if not same_kind:
        raise UserError(
            f"{directive!r}: the field holds {type(current).__name__} {current!r}, not {type(value).__name__}"
        )


def apply_fiddler(cfg: fdl.Config, directive: str, module: ModuleType) -> None:
    from nnxlm.recipes import fiddlers

    text = directive[len("fiddler:") :]
    try:
        call = ast.parse(text if "(" in text else text + "()", mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError
        name = ast.unparse(call.func)
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        raise UserError(f"{directive!r} is not of the form fiddler:NAME or fiddler:NAME(literal args)") from None
    function = getattr(module, name, None) if module is not None else None  # the recipe file's own
    function = function or getattr(fiddlers, name, None)
    if function is None and "." in name:
        module_name, _, attribute = name.rpartition(".")
        try:
            function = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError:
            function = None
    if not callable(function):
        known = [n for n, v in vars(fiddlers).items() if callable(v) and v.__module__ == fiddlers.__name__]
        raise UserError(f"{directive!r}: unknown fiddler {name!r}; nnxlm.recipes.fiddlers has {', '.join(known)}")
    try:
        function(cfg, *args, **kwargs)
    except TypeError as e:
        raise UserError(f"{directive!r}: bad arguments for {name} ({e})") from e
