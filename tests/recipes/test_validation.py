"""check_recipe: every built-in recipe passes; each bad value is one line naming its field path,
the value and the fix (the command-line table is tests/test_cli_bad_inputs.py)."""

import inspect

import fiddle as fdl
import jax.numpy as jnp
import pytest

from nnxlm import recipes
from nnxlm.data import Mixture, ParquetFiles, Synthetic
from nnxlm.errors import UserError
from nnxlm.recipes import models
from nnxlm.recipes.serialization import from_json, to_json
from nnxlm.recipes.validation import check_recipe


def _model_recipes():
    """The model recipes of nnxlm.recipes.models that take no arguments (the published sizes)."""
    for name, function in vars(models).items():
        if inspect.isfunction(function) and function.__module__ == models.__name__:
            parameters = inspect.signature(function).parameters.values()
            if all(p.default is not p.empty or p.kind is p.VAR_KEYWORD for p in parameters):
                if name not in ("qwen2_5", "qwen3", "gemma2", "gemma3"):  # families: sizes are required
                    yield name, function


@pytest.mark.parametrize("name", recipes.RECIPES)
def test_every_experiment_recipe_passes(name):
    check_recipe(recipes.RECIPES[name]())


@pytest.mark.parametrize("name, function", list(_model_recipes()))
def test_every_model_recipe_passes_on_its_own(name, function):
    check_recipe(function(), "model")


def test_the_recipe_a_trainer_records_passes_through_json():
    recorded = fdl.build(recipes.tiny()).recipe  # every argument, defaults included, as configs
    check_recipe(from_json(to_json(recorded)))


def test_the_message_names_the_path_the_value_and_the_fix():
    cfg = recipes.llama3_8b()
    cfg.model.block.attention.num_kv_heads = 3
    with pytest.raises(UserError) as error:
        check_recipe(cfg)
    assert str(error.value) == (
        "recipe field model.block.attention.num_kv_heads is 3: num_heads (32) must divide by it; "
        "use 1, 2, 4, 8, 16 or 32"
    )


def test_a_model_recipe_alone_is_named_from_where_it_sits():
    model = models.llama_tiny()
    model.block.mlp.hidden_dim = -1
    with pytest.raises(UserError, match=r"^recipe field model\.block\.mlp\.hidden_dim is -1: use a whole number"):
        check_recipe(model, "model")


def _set(path: str, value):
    """An edit of a recipe: the field at the dotted path becomes value."""

    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node[int(part)] if isinstance(node, (list, tuple)) else getattr(node, part)
        setattr(node, last, value)

    return edit


def _both(*edits):
    def edit(cfg):
        for one in edits:
            one(cfg)

    return edit


@pytest.mark.parametrize(
    "recipe, edit, message",
    [
        ("tiny", _set("num_steps", True), "num_steps is True: use a whole number of at least 1"),
        ("tiny", _set("num_steps", None), "num_steps is None"),
        ("tiny", _set("optimizer.learning_rate", float("nan")), "learning_rate is nan: use a number > 0"),
        ("tiny", _set("optimizer.learning_rate", "3e-4"), "learning_rate is '3e-4'"),
        (
            "tiny",
            _both(_set("grad_accum_steps", 2), _set("mesh", {"data": 8})),
            "batch_size is 8: the mesh splits it over data (8); use a multiple of 16",
        ),
        (
            "tiny",
            _both(_set("sharding_rules", {"length": "tensor"}), _set("mesh", {"data": -1, "tensor": 3})),
            "seq_len is 64: the mesh splits it over tensor (3); use a multiple of 3",
        ),
        ("tiny", _set("sharding_rules", {"tokens": "data"}), "sharding_rules.tokens is 'data': no such logical axis"),
        ("tiny", _set("mesh", [8]), "mesh is [8]: give a dict"),
        ("tiny", _set("eval_data.eval_fraction", -0.1), "eval_data.eval_fraction is -0.1: use a number in [0, 1)"),
        ("tiny", _set("train_data.vocab_size", 3), "train_data.vocab_size is 3: use a whole number of at least 4"),
        (
            "tiny",
            _set("train_data", fdl.Config(Mixture, sources=[fdl.Config(Synthetic, vocab_size=999)], weights=[1])),
            "train_data.sources[0].vocab_size is 999: use at most the model's vocab_size (256)",
        ),
        (
            "tiny",
            _set("train_data", fdl.Config(ParquetFiles, globs=[], eval_fraction=0.1)),
            "train_data.globs is []: give a list of file patterns",
        ),
        ("tiny", _set("model.layer_pattern", ({"sliding_window": 0},)), "model.layer_pattern.0.sliding_window is 0"),
        ("tiny", _set("model.layer_pattern", ()), "model.layer_pattern is ()"),
        ("tiny", _set("model.block.attention.num_kv_heads", 8), "num_kv_heads is 8: num_heads (4) must divide"),
        (
            "tiny",
            _set("model.block.attention.context_parallel", "rings"),
            "model.block.attention.context_parallel is 'rings': use one of 'all_gather', 'ring'",
        ),
        ("deepseek_v3", _set("model.block.attention.context_parallel", None), "context_parallel is None: use one of"),
        (
            "llama3_1_8b",
            _set("model.block.attention.rope_scaling", {"type": "llama3", "factor": 8.0}),
            "model.block.attention.rope_scaling.low_freq_factor is None: use a number > 0",
        ),
        ("deepseek_v3", _set("model.first_block.mlp.hidden_dim", 0), "model.first_block.mlp.hidden_dim is 0"),
        (
            "deepseek_v3",
            _both(_set("model.block.mlp.num_groups", 64), _set("model.block.mlp.num_groups_per_token", 1)),
            "num_experts_per_token is 8: use at most the 4 experts of kept groups",
        ),
        (
            "deepseek_v3",
            _set("model.block.mlp.num_groups_per_token", 9),
            "num_groups_per_token is 9: use 1 to num_groups",
        ),
        ("deepseek_v3", _set("model.num_first_layers", 61), "model.num_first_layers is 61: use 0 to num_layers - 1"),
        (
            "deepseek_v3",
            _set("model.block.attention.rope_scaling", {"type": "yarn", "factor": 4.0, "scale": 2}),
            "model.block.attention.rope_scaling.scale is 2: remove it",
        ),
        ("qwen3_30b_a3b", _set("mesh", {"expert": 3, "data": -1}), "batch_size is 1024: the mesh splits it over"),
        ("qwen3_30b_a3b", _set("model.block.mlp.shared_hidden_dim", 64), "num_shared_experts is 0: set it too"),
        (
            "mixtral_8x7b",
            _set("model.block.mlp.capacity_factor", 0),
            "capacity_factor is 0: use a number > 0 (or None)",
        ),
        # pipeline parallelism (nnxlm.modules.pipeline): tiny has 4 layers and 8 rows a step
        (
            "tiny",
            _set("mesh", {"pipeline": 3, "data": -1}),
            "model.num_layers is 4: the 4 pipelined layers must divide by stages (3) x repeats (1)",
        ),
        (
            "tiny",
            _both(_set("mesh", {"pipeline": 2}), _set("pipeline_microbatches", 3)),
            "pipeline_microbatches is 3: the 8 rows of a step (per accumulation) must divide by it",
        ),
        (
            "tiny",
            _both(_set("mesh", {"pipeline": 2, "data": 4}), _set("pipeline_microbatches", 4)),
            "pipeline_microbatches is 4: its micro-batches of 2 rows are split over data (4)",
        ),
        (
            "tiny",
            _both(_set("mesh", {"pipeline": 4}), _set("pipeline_schedule", "circular"), _set("pipeline_repeats", 2)),
            "model.num_layers is 4: the 4 pipelined layers must divide by stages (4) x repeats (2)",
        ),
        (
            "tiny",
            _both(
                _set("mesh", {"pipeline": 4, "data": 2}),
                _set("model.num_layers", 8),
                _set("pipeline_schedule", "circular"),
                _set("pipeline_repeats", 2),
                _set("pipeline_microbatches", 2),
            ),
            "pipeline_microbatches is 2: the circular schedule needs at least the 4 stages",
        ),
        ("tiny", _set("pipeline_schedule", "1f1b"), "pipeline_schedule is '1f1b': use one of 'gpipe', 'circular'"),
        (
            "tiny",
            _both(_set("mesh", {"pipeline": 2}), _set("pipeline_repeats", 2)),
            "pipeline_repeats is 2: repeats need pipeline_schedule='circular'",
        ),
        ("tiny", _both(_set("mesh", {"pipeline": 2}), _set("model.scan_layers", False)), "model.scan_layers is False"),
        ("tiny", _set("mesh", {"pipeline": 2, "expert": 2}), "mesh.expert is 2: expert parallelism does not run"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_field(recipe, edit, message):
    cfg = recipes.RECIPES[recipe]()
    edit(cfg)
    with pytest.raises(UserError) as error:
        check_recipe(cfg)
    text = str(error.value)
    assert text.startswith("recipe field ") and "\n" not in text and message in text, text


def test_values_left_to_the_device_count_pass():
    cfg = recipes.mixtral_8x7b()
    cfg.mesh = {"expert": -1}  # how many experts a device holds is known only on the devices
    check_recipe(cfg)


def test_dtypes_may_be_jax_types_in_python_recipes():
    cfg = recipes.tiny()
    cfg.model.dtype = jnp.bfloat16
    check_recipe(cfg)
