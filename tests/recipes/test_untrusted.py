"""Recipe JSON from someone else runs none of their code: every name it holds but the classes of the
packages recipes are built from (and a few container types fiddle writes) is refused, in one line
naming it, before anything is imported or called;
--trust_recipe_code / trust_recipe_code() lifts that. Every shipped recipe loads untrusted."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import fiddle as fdl
import pytest
import tokenizers

import nnxlm
from nnxlm.cli import main
from nnxlm.errors import UserError
from nnxlm.recipes import RECIPES, fiddlers
from nnxlm.recipes.serialization import from_json, to_json, trust_recipe_code

ROOT = Path(__file__).resolve().parents[2]


def payload(**kwargs) -> None:
    """Stands in for the callable under test in a recipe; its reference is renamed afterwards."""


def _rename(data, module: str, name: str):
    """The recipe JSON `data` with every reference to payload renamed module.name."""
    if isinstance(data, dict):
        if data.get("type") == "pyref" and (data["module"], data["name"]) == (payload.__module__, "payload"):
            return {**data, "module": module, "name": name}
        return {k: _rename(v, module, name) for k, v in data.items()}
    if isinstance(data, list):
        return [_rename(v, module, name) for v in data]
    return data


def _recipe_naming(module: str, name: str, marker: Path) -> dict:
    """A recipe whose root, built, calls module.name with arguments that make it write `marker`
    (subprocess.run, os.system; others fail after their import)."""
    arguments = {"args": ["touch", str(marker)]} if name == "run" else {"command": f"touch {marker}"}
    return _rename(to_json(fdl.Config(payload, **arguments)), module, name)


@pytest.fixture
def module_writing_a_file(tmp_path, monkeypatch):
    """An importable module whose import alone writes tmp_path/imported."""
    (tmp_path / "nnxlm_test_side_effect.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\n\ndef run(command):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "imported"


REFUSED = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "exec"),
    ("builtins", "eval"),
    ("subprocess", "run"),
    ("shutil", "rmtree"),
    ("importlib", "import_module"),
    ("nnxlm_test_side_effect", "run"),  # importing it would already write a file
    ("nnxlm.files", "os.system"),  # an nnxlm module's import of os
    ("nnxlm.__main__", "main"),  # private, and runs the command line when imported
    ("nnxlm.cli", "main"),  # nnxlm code that runs other code
    ("nnxlm.recipes.directives", "resolve"),  # imports recipe files
    ("nnxlm.checkpointing", "from_json"),  # could load with trust
    ("nnxlm.files", "write_atomically"),  # public nnxlm, but it writes whatever file it is given
    ("nnxlm.data.prepared", "prepare"),  # in a package recipes build from, but a function: writes shards
]


@pytest.mark.parametrize("module, name", REFUSED)
def test_a_recipe_naming_code_outside_nnxlm_is_refused_in_one_line(tmp_path, module_writing_a_file, module, name):
    data = _recipe_naming(module, name, tmp_path / "touched")
    with pytest.raises(UserError, match="trust_recipe_code") as error:
        from_json(data)
    message = str(error.value)
    assert f"names {module}.{name}, which " in message and "refused" in message and "\n" not in message
    with pytest.raises(UserError):
        from_json(json.dumps(data))  # the text form too
    assert not module_writing_a_file.exists() and not (tmp_path / "touched").exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("subprocess", "run"), ("nnxlm_test_side_effect", "run")])
def test_train_and_inspect_refuse_such_a_recipe_file(tmp_path, capsys, module_writing_a_file, module, name):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(_recipe_naming(module, name, tmp_path / "touched")))
    for command in ("inspect", "train"):
        assert main([command, "--recipe", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{module}.{name}" in err and "refused" in err, err
    assert not module_writing_a_file.exists() and not (tmp_path / "touched").exists()


def test_trust_allows_any_importable_callable(tmp_path):
    data = _recipe_naming("subprocess", "run", tmp_path / "touched")
    assert fdl.get_callable(from_json(data, trust=True)) is subprocess.run
    with trust_recipe_code():
        assert fdl.get_callable(from_json(data)) is subprocess.run
        with pytest.raises(UserError, match="subprocess.run"):
            from_json(data, trust=False)  # an explicit argument wins over the setting
    with pytest.raises(UserError, match="subprocess.run"):
        from_json(data)  # the block ended: untrusted again
    assert not (tmp_path / "touched").exists()  # loading builds nothing; building runs it:
    fdl.build(from_json(data, trust=True))
    assert (tmp_path / "touched").exists()


def _file_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"nnxlm_test_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


EDITS = {
    "as shipped": lambda cfg: None,
    "sft": lambda cfg: fiddlers.sft(cfg, "train.jsonl", eval_fraction=0.1),
    "lora": lambda cfg: fiddlers.lora(cfg, rank=4),
    "others": lambda cfg: [fiddlers.synthetic_data(cfg), fiddlers.bfloat16(cfg), fiddlers.quick(cfg)],
}


@pytest.mark.parametrize("recipe", [*RECIPES, "recipes/demo.py", "recipes/sft.py"])
def test_every_shipped_recipe_loads_untrusted(recipe):
    function = _file_recipe(Path(recipe).stem) if recipe.endswith(".py") else RECIPES[recipe]
    for edit in EDITS.values():
        cfg = function()
        edit(cfg)
        data = to_json(cfg)
        loaded = from_json(data)
        assert loaded == cfg and to_json(loaded) == data


def test_a_run_directory_whose_recipe_was_tampered_with_does_not_decode(tmp_path, capsys):
    from flax import nnx

    from nnxlm.convert import from_hf, to_hf
    from nnxlm.recipes import models

    to_hf(fdl.build(models.llama_tiny(vocab_size=97))(rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    assert "has no tokenizer" in capsys.readouterr().err  # (the exported model has none)
    nnxlm.load_model(str(tmp_path / "run"))  # the recipe a run directory holds loads untrusted
    # someone else's copy of it, its saved recipe's model now a call of subprocess.run
    run = tmp_path / "theirs"
    shutil.copytree(tmp_path / "run", run)
    (metadata,) = run.glob("checkpoints/*/recipe/metadata")
    recipe = from_json(metadata.read_text())
    recipe.model = fdl.Config(payload, args=["touch", str(tmp_path / "touched")])
    metadata.write_text(json.dumps(_rename(to_json(recipe), "subprocess", "run")))
    # and a tokenizer, so that decode gets as far as building the model (trusted, it writes the file)
    vocabulary = tokenizers.models.WordLevel({"[UNK]": 0, "def": 1}, unk_token="[UNK]")
    tokenizers.Tokenizer(vocabulary).save(str(run / "tokenizer.json"))
    assert main(["decode", "--checkpoint", str(run), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "subprocess.run" in err and "refused" in err, err
    with pytest.raises(UserError, match="subprocess.run"):
        nnxlm.load_model(str(run))
    assert not (tmp_path / "touched").exists()


def test_json_that_is_no_recipe_is_a_value_error():
    for text in ("{}", "[]", '{"root": {"type": "ref", "key": "x"}, "objects": {}}'):
        with pytest.raises(ValueError, match="not a fiddle recipe"):
            from_json(text)
