import copy

import fiddle as fdl
import pytest

import nnxlm
from nnxlm.errors import UserError
from nnxlm.recipes import directives
from nnxlm.recipes.serialization import from_json, to_json
from nnxlm.report import describe


def test_recipe_json_round_trip_gives_an_equal_recipe():
    cfg = nnxlm.recipes.tiny()
    cfg.model.block.attention.num_heads = 8
    assert from_json(to_json(cfg)) == cfg


def test_a_built_trainer_records_the_recipe_it_was_built_from():
    cfg = nnxlm.recipes.tiny()
    cfg.optimizer.learning_rate = 1e-2
    trainer = fdl.build(cfg)
    recorded = from_json(to_json(trainer.recipe))
    assert recorded.optimizer.learning_rate == 1e-2
    assert recorded.model.block.attention.num_kv_heads == cfg.model.block.attention.num_kv_heads
    assert fdl.build(recorded).model_factory.keywords["d_model"] == 64


def test_a_fine_tuning_recipe_is_recorded_with_its_objective_and_adapters():
    from nnxlm.objectives import SFT
    from nnxlm.recipes import fiddlers

    cfg = nnxlm.recipes.tiny()
    fiddlers.sft(cfg, "chat/*.jsonl", loss_on="all", overlong="drop")
    fiddlers.lora(cfg, rank=4, targets=("q", "v"), dropout=0.05)
    cfg.load_parameters_path, cfg.freeze = "runs/base", "embedder"
    trainer = fdl.build(cfg)
    recorded = from_json(to_json(trainer.recipe))  # what recipe.json holds
    rebuilt = fdl.build(recorded)
    assert rebuilt.objective == SFT(loss_on="all", overlong="drop") and rebuilt.trainable == "lora"
    assert rebuilt.model_factory.keywords["lora"].targets == ("q", "v")
    assert (rebuilt.load_parameters_path, rebuilt.freeze) == ("runs/base", "embedder")


def test_deepcopy_branches_a_recipe():
    base = nnxlm.recipes.tiny()
    branch = copy.deepcopy(base)
    branch.model.block.mlp.hidden_dim = 4
    assert base.model.block.mlp.hidden_dim == 192


PUBLISHED_PARAMETER_COUNTS = [
    ("llama2_7b", "6.74 B"),
    ("llama3_8b", "8.03 B"),
    ("llama3_1_8b", "8.03 B"),
    ("llama3_2_1b", "1.24 B"),
    ("llama3_2_3b", "3.21 B"),
    ("llama3_3_70b", "70.55 B"),  # 70,553,706,496: "70.6 B" on the model card
    ("mistral_7b", "7.24 B"),
    ("mixtral_8x7b", "46.70 B"),
    ("mixtral_8x22b", "140.63 B"),  # "141 B" on the model card
    ("qwen2_5_0_5b", "494.03 M"),
    ("qwen2_5_1_5b", "1.54 B"),
    ("qwen2_5_7b", "7.62 B"),
    ("qwen3_0_6b", "596.05 M"),  # "0.6 B" on the model card
    ("qwen3_8b", "8.19 B"),
    ("qwen3_30b_a3b", "30.53 B"),  # "30.5 B"
    ("gemma_2b", "2.51 B"),
    ("gemma_7b", "8.54 B"),
    ("gemma2_2b", "2.61 B"),
    ("gemma2_9b", "9.24 B"),
    ("gemma2_27b", "27.23 B"),  # "27.2 B" on the model card
    ("deepseek_v3", "671.03 B"),  # "671 B", without the multi-token prediction module (reported apart)
]


@pytest.mark.parametrize("name, billions", PUBLISHED_PARAMETER_COUNTS)
def test_inspect_reports_the_published_parameter_counts(name, billions):
    report = describe(directives.resolve([name]))
    assert f"({billions})" in report
    assert "training FLOPs per token" in report and "total" in report


def test_inspect_lists_every_field_with_where_it_was_set():
    report = describe(directives.resolve(["tiny", "set:model.num_layers=2"]))
    line = next(line for line in report.splitlines() if line.startswith("model.num_layers = 2"))
    assert "directives.py" in line or "@" in line


def test_set_and_fiddler_directives_apply_in_order():
    cfg = directives.resolve(
        [
            "tiny",
            "set:num_steps=7",
            "fiddler:quick(steps=4)",
            "set:model.block.mlp.activation='gelu'",
            "fiddler:loop_layers",
        ]
    )
    assert cfg.num_steps == 4 and cfg.checkpoint_every == 4
    assert cfg.model.block.mlp.activation == "gelu"
    assert cfg.model.scan_layers is False
    assert cfg.name == "tiny"


def test_recipe_file_with_function_name(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        "import nnxlm\n\ndef small():\n    cfg = nnxlm.recipes.tiny()\n    cfg.num_steps = 3\n    return cfg\n"
    )
    cfg = directives.resolve([f"{path}:small"])
    assert cfg.num_steps == 3 and cfg.name == "tiny"  # the recipe set its own name


@pytest.mark.parametrize(
    "recipe, message",
    [
        (["nope"], "unknown recipe 'nope'"),
        (["missing/file.py"], "recipe file missing/file.py does not exist"),
        (["tiny", "set:model.nm_layers=2"], "has no field 'nm_layers'"),
        (["tiny", "set:model.dtype=bfloat16"], "is not a Python literal"),
        (["tiny", "set:num_steps='ten'"], "holds int 20, not str"),
        (["tiny", "set:num_steps"], "is not of the form set:path.to.field=VALUE"),
        (["tiny", "fiddler:no_such_edit"], "unknown fiddler 'no_such_edit'"),
        (["tiny", "fiddler:quick(steps=x)"], "is not of the form fiddler:NAME"),
        (["tiny", "tiny"], "must start with set: or fiddler:"),
        (["set:num_steps=3"], "the first --recipe must name a recipe"),
    ],
)
def test_bad_directives_name_the_problem(recipe, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        directives.resolve(recipe)


def test_a_saved_recipe_json_is_a_base_directive(tmp_path):
    path = tmp_path / "recipe.json"
    import json

    cfg = nnxlm.recipes.tiny()
    cfg.num_steps = 9
    path.write_text(json.dumps(to_json(cfg)))
    assert directives.resolve([str(path), "set:seq_len=32"]) == directives.resolve(
        ["tiny", "set:num_steps=9", "set:seq_len=32"]
    )
    path.write_text("{not json")
    with pytest.raises(UserError, match="is not an nnxlm recipe JSON"):
        directives.resolve([str(path)])


def test_text_files_fiddler_points_a_recipe_at_user_data(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n")
    cfg = directives.resolve(["tiny", f"fiddler:text_files('{tmp_path}/*.txt', eval_fraction=0.2)"])
    train, held_out = fdl.build(cfg.train_data).documents(), fdl.build(cfg.eval_data).documents()
    assert len(train) + len(held_out) == 30 and held_out and not set(train) & set(held_out)


def test_moe_flops_count_the_active_experts_only():
    from flax import nnx

    from nnxlm.metrics import training_flops_per_token

    cfg = directives.resolve(["qwen3_30b_a3b"])
    model = nnx.eval_shape(lambda: fdl.build(cfg).model_factory(rngs=nnx.Rngs(0)))
    # about 3.3 B active parameters: 6 x 3.3 G plus attention, far below 6 x 30.5 G
    assert 19e9 < training_flops_per_token(model, 4096) < 26e9


def test_deepseek_v3_flops_count_active_experts_latent_attention_and_prediction_depth():
    from flax import nnx

    from nnxlm.metrics import training_flops_per_token
    from nnxlm.report import activation_bytes_per_token

    model = nnx.eval_shape(lambda: fdl.build(nnxlm.recipes.models.deepseek_v3())(rngs=nnx.Rngs(0)))
    # 37.5 B active in the main model (8 of 256 experts) + 0.7 B in the prediction module (its block
    # and projection) + its extra pass through the head = 38.2 B: 6 x 38.2 G = 229.4 G, plus latent
    # attention in 61 + 1 layers: 6 x 4096 x 62 x 128 heads x (192 + 128) / 2 = 31.2 G
    assert 259e9 < training_flops_per_token(model, 4096) < 262e9
    report = describe(directives.resolve(["deepseek_v3"]))
    assert "+ 11,610,067,968 (11.61 B) in multi-token prediction" in report
    # per token and layer (61 + 1 prediction depth): norm inputs and block input 3 x 7168, MLA's
    # latents 1536 + 512 + 64 and 2 x 128 heads x (192 + 128), 128 x 4096 probabilities, and 3 x the
    # hidden width of 8 routed experts of 2048 plus the shared one
    per_token = activation_bytes_per_token(model, 4096, "none") / 4
    assert per_token == 62 * (3 * 7168 + 2112 + 2 * 128 * 320 + 128 * 4096 + 3 * (8 * 2048 + 2048))


def test_published_recipes_set_the_family_attention_options():
    attention = {
        name: nnxlm.recipes.RECIPES[name]().model.block.attention
        for name in ("mistral_7b", "qwen2_5_7b", "qwen3_8b", "llama3_3_70b")
    }
    assert attention["mistral_7b"].sliding_window == 4096
    assert attention["qwen2_5_7b"].qkv_bias is True
    assert attention["qwen3_8b"].qk_norm.eps == 1e-6
    assert attention["llama3_3_70b"].rope_scaling["factor"] == 8.0


def test_training_flops_count_sliding_windows_per_layer():
    import fiddle as fdl
    from flax import nnx

    from nnxlm.metrics import training_flops_per_token

    def flops(**changes):
        cfg = nnxlm.recipes.models.llama_tiny()
        for name, value in changes.items():
            setattr(cfg, name, value)
        return training_flops_per_token(nnx.eval_shape(lambda: fdl.build(cfg)(rngs=nnx.Rngs(0))), 64)

    full_attention = 6 * 64 * 4 * 4 * 16  # 6 x seq_len x layers x heads x head_dim
    # every second layer sees 16 of 64 keys: (2 * 16 - 16 * 16 / 64) / 64 = 7 / 16 of full attention
    alternating = flops(layer_pattern=({"sliding_window": 16}, {"sliding_window": None}))
    assert abs((flops() - alternating) - full_attention * (1 - (1 + 7 / 16) / 2)) < 1e-6
