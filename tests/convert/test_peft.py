"""LoRA adapters out to Hugging Face peft and back in, checked against peft and transformers."""

import json

import fiddle as fdl
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import nnxlm
from nnxlm.checkpointing import load_recipe, save_model_checkpoint, stored_layout
from nnxlm.cli import main
from nnxlm.convert import from_hf, to_hf
from nnxlm.errors import UserError
from nnxlm.modules.lora import LoRA, adapted
from nnxlm.recipes.serialization import to_json
from tests.convert.harness import PROMPT, TINY_SHAPE, hf_logits, perturbed

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def llama():
    return perturbed(LlamaForCausalLM(LlamaConfig(**TINY_SHAPE, rms_norm_eps=1e-5, rope_theta=500.0)))


def gemma2():
    config = Gemma2Config(
        vocab_size=101, hidden_size=48, intermediate_size=80, head_dim=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, rope_theta=1000.0,
    )  # fmt: skip
    return perturbed(Gemma2ForCausalLM(config))


def assert_close(got, expected) -> None:
    """Within 1e-4 of the logits' scale."""
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(got - expected)) / scale < 1e-4, np.max(np.abs(got - expected)) / scale


def lora_run(tmp_path, hf_model, scan_layers=True):
    """An nnxlm run directory holding the HF model with random LoRA adapters on TARGETS; (run
    directory, its model, the HF base directory)."""
    base = tmp_path / "base_hf"
    hf_model.save_pretrained(base)
    from_hf(str(base), str(tmp_path / "base_run"))
    recipe = load_recipe(str(tmp_path / "base_run"))
    recipe.model.lora = fdl.Config(LoRA, rank=4, alpha=8.0, targets=TARGETS)
    recipe.model.scan_layers = scan_layers
    model = fdl.build(recipe.model)(rngs=nnx.Rngs(1))
    base_model = nnxlm.load_model(str(tmp_path / "base_run"))
    frozen = nnx.state(base_model)
    if not scan_layers:
        base_model.unstack_layers()
        frozen = nnx.state(base_model)
    nnx.update(model, frozen)
    for i, module in enumerate(adapted(model)):  # adapters that change the logits
        b = module.adapter.b
        b[...] = np.random.default_rng(i).normal(size=b.shape).astype(np.float32) * 0.3
    run = tmp_path / "lora_run"
    state = stored_layout(nnx.to_pure_dict(nnx.state(model)))
    save_model_checkpoint(str(run / "checkpoints"), 0, state, to_json(recipe))
    return run, model, base


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_an_adapter_exported_to_peft_gives_nnxlms_logits_and_comes_back(tmp_path, family):
    from peft import AutoPeftModelForCausalLM, PeftModel

    run, model, base = lora_run(tmp_path, llama() if family == "llama" else gemma2())
    ours = np.asarray(model(np.array(PROMPT, np.int32)))
    assert main(["convert", "to-hf", str(run), str(tmp_path / "adapter"), "--adapter", "--base", str(base)]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == str(base)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    base_logits = hf_logits(base_model, PROMPT)
    with_adapter = PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
    peft_logits = hf_logits(with_adapter, PROMPT)
    assert_close(ours, peft_logits)
    assert np.max(np.abs(peft_logits - base_logits)) > 1e-2 * np.max(np.abs(base_logits))  # the adapter matters
    # peft finds the base itself through base_model_name_or_path
    assert_close(hf_logits(AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval(), PROMPT), ours)

    # merged: one plain HF model with the same logits
    assert main(["convert", "to-hf", str(run), str(tmp_path / "merged"), "--merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(hf_logits(merged, PROMPT), peft_logits)

    # and back in: the adapter on its base, as one nnxlm run directory that trains the adapter
    assert main(["convert", "from-hf", str(tmp_path / "adapter"), str(tmp_path / "back"), "--base", str(base)]) == 0
    back = nnxlm.load_model(str(tmp_path / "back"))
    assert_close(np.asarray(back(np.array(PROMPT, np.int32))), peft_logits)
    assert load_recipe(str(tmp_path / "back")).trainable == "lora"


def test_unscanned_adapters_export_and_a_peft_save_imports_with_its_named_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    run, model, base = lora_run(tmp_path, llama(), scan_layers=False)
    to_hf(model, str(tmp_path / "adapter"), adapter=True)
    # an adapter that peft itself trained and saved, whose config names its base directory
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft_saved")
    config_path = tmp_path / "peft_saved" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(base)}))
    from_hf(str(tmp_path / "peft_saved"), str(tmp_path / "imported"))
    imported = nnxlm.load_model(str(tmp_path / "imported"))
    with torch.no_grad():
        expected = peft_model(torch.tensor(PROMPT)).logits.numpy()
    assert_close(np.asarray(imported(np.array(PROMPT, np.int32))), expected)
    assert imported.lora.rank == 2 and set(imported.lora.targets) == {"q_proj", "v_proj", "down"}


def test_exports_say_what_to_choose(tmp_path):
    run, model, _ = lora_run(tmp_path, llama())
    with pytest.raises(UserError, match="has LoRA adapters: export --merged"):
        to_hf(str(run), str(tmp_path / "plain"))
    with pytest.raises(UserError, match="has no LoRA adapters"):
        to_hf(str(tmp_path / "base_run"), str(tmp_path / "x"), adapter=True)
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "base_model_name_or_path": "org/not-here", "target_modules": ["q"]})
    )
    with pytest.raises(UserError, match="'org/not-here'.*is not a local directory: give the base model's directory"):
        from_hf(str(tmp_path / "lonely"), str(tmp_path / "y"))


def test_a_peft_adapter_on_all_linear_layers_imports_with_peft_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base_hf"
    llama().save_pretrained(base)
    # peft saves "all-linear" as every projection's full module name (model.layers.0.mlp.up_proj, ...)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft_saved")
    saved = json.loads((tmp_path / "peft_saved" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, list) and all(name.startswith("model.layers.") for name in saved)
    from_hf(str(tmp_path / "peft_saved"), str(tmp_path / "imported"), base=str(base))
    imported = nnxlm.load_model(str(tmp_path / "imported"))
    with torch.no_grad():
        expected = peft_model(torch.tensor(PROMPT)).logits.numpy()
    assert_close(np.asarray(imported(np.array(PROMPT, np.int32))), expected)
    assert set(imported.lora.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"}


def test_a_peft_adapter_on_the_head_imports_with_peft_logits_and_its_base_copies_are_checked(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file, save_file

    base = tmp_path / "base_hf"
    llama().save_pretrained(base)

    def peft_save(targets, name):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False),
        ).eval()
        model.save_pretrained(tmp_path / name)  # with copies of the targeted head or embedding
        return model, tmp_path / name

    peft_model, saved = peft_save(["q_proj", "lm_head"], "head")
    weights = load_file(saved / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in weights
    from_hf(str(saved), str(tmp_path / "imported"), base=str(base))
    imported = nnxlm.load_model(str(tmp_path / "imported"))
    with torch.no_grad():
        expected = peft_model(torch.tensor(PROMPT)).logits.numpy()
    assert_close(np.asarray(imported(np.array(PROMPT, np.int32))), expected)
    assert set(imported.lora.targets) == {"q_proj", "head"}

    # a copy of the head that is not the base's (another base, a resized vocabulary) is refused
    weights["base_model.model.lm_head.base_layer.weight"][0, 0] += 1.0
    save_file(weights, saved / "adapter_model.safetensors")
    with pytest.raises(UserError, match="lm_head.base_layer.weight is not the base model's lm_head.weight"):
        from_hf(str(saved), str(tmp_path / "other"), base=str(base))

    _, saved = peft_save(["q_proj", "embed_tokens"], "embedding")
    with pytest.raises(UserError, match="lora_embedding_A is a LoRA on an embedding.*leave embed_tokens out"):
        from_hf(str(saved), str(tmp_path / "embedding_run"), base=str(base))


def test_an_adapter_on_some_layers_only_is_refused_naming_the_way_around(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base_hf"
    llama().save_pretrained(base)
    layer_0 = LoraConfig(r=2, target_modules=r".*layers\.0\.self_attn\.q_proj", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), layer_0).save_pretrained(tmp_path / "layer_0")
    with pytest.raises(
        UserError, match=r"no model.layers.1.self_attn.q_proj.lora_A: it adapts only some layers.*merge"
    ):
        from_hf(str(tmp_path / "layer_0"), str(tmp_path / "run"), base=str(base))
