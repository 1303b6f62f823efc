"""Quantized runs: `nnxlm quantize`, load_model(quantize=), quality against float32 on a trained
model, decode and serve from int8 checkpoints, QLoRA equal to LoRA over the dequantized base."""

import json
import os
import shutil

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnxlm
import nnxlm.checkpointing
import nnxlm.errors
import nnxlm.recipes.fiddlers
from nnxlm.cli import main
from nnxlm.modules.quantization import Quantization
from nnxlm.quantize import agreement, cache_bytes_per_token, weight_bytes

FORMS = {
    "int8 weights": dict(weights="int8"),
    "int8 KV cache": dict(weights=None, kv="int8"),
    "both": dict(weights="int8", kv="int8"),
}


@pytest.fixture(scope="module")
def trained_run(text_run, tmp_path_factory):
    """The demo's shape (6 layers of width 256) trained briefly on Python source, so that its
    predictions are confident enough for quantization error to show, with text_run's tokenizer."""
    from nnxlm.data import PythonStdlib
    from nnxlm.recipes import models

    cfg = nnxlm.recipes.tiny()
    cfg.model = models.llama(vocab_size=512, d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, mlp_dim=1024)
    cfg.model.scan_layers = False
    cfg.train_data, cfg.eval_data = fdl.Config(PythonStdlib), None
    cfg.tokenizer_path = os.path.join(text_run, "tokenizer.model")
    cfg.seq_len, cfg.batch_size, cfg.num_steps, cfg.checkpoint_every = 128, 8, 80, 0
    cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 3e-3, 20
    cfg.workdir = str(tmp_path_factory.mktemp("quantize") / "float")
    fdl.build(cfg).fit()
    return cfg.workdir


@pytest.fixture(scope="module")
def held_out(trained_run):
    """8 rows of 128 tokens of the eval split (files the model never saw)."""
    from nnxlm.data import PythonStdlib, load_tokenizer

    tokenizer = load_tokenizer(nnxlm.checkpointing.load_recipe(trained_run).tokenizer_path)
    text = "\n".join(open(p, encoding="utf-8").read() for p in PythonStdlib(split="eval").documents()[:20])
    ids = np.asarray(tokenizer.encode(text)[: 8 * 128]).reshape(8, 128)
    return list(ids)


@pytest.mark.parametrize("form", FORMS)
def test_quantized_predictions_pass_the_quality_gates(trained_run, held_out, form):
    reference = nnxlm.load_model(trained_run)
    model = nnxlm.load_model(trained_run, quantize=FORMS[form])
    result = agreement(reference, model, held_out)
    assert result["reference_perplexity"] < 100  # trained: far below the 512-token vocabulary's
    assert result["perplexity_ratio"] < 1.01, result
    assert result["kl"] < 0.01, result
    assert result["top1"] > 0.95, result
    assert result["kl"] > 0  # something was quantized


def test_nnxlm_quantize_writes_a_run_that_decodes_and_serves(trained_run, tmp_path, capsys):
    out = str(tmp_path / "int8")
    assert main(["quantize", trained_run, out, "--weights", "int8", "--kv", "int8"]) == 0
    recipe = json.load(open(os.path.join(out, "recipe.json")))
    assert "Quantization" in json.dumps(recipe)
    model = nnxlm.load_model(out)
    assert model.quantization == Quantization(kv="int8")
    assert model.layers[0].attention.q_proj.kernel.dtype == jnp.int8
    float_model = nnxlm.load_model(trained_run)
    assert weight_bytes(model) < 0.45 * weight_bytes(float_model)  # the float head and embedding stay
    assert cache_bytes_per_token(model) * 3 < cache_bytes_per_token(float_model)
    # the checkpoint holds exactly what quantizing at load time makes
    at_load = nnxlm.load_model(trained_run, quantize=Quantization(kv="int8"))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(at_load)), strict=True):
        np.testing.assert_array_equal(a, b)

    # the run trained with a tokenizer_path elsewhere keeps a copy, which the quantized run takes
    # along and finds wherever it is moved
    assert os.path.exists(os.path.join(trained_run, "tokenizer.model")) and recipe["objects"]
    assert nnxlm.checkpointing.load_recipe(out).tokenizer_path is None
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)
    prompt = "def main(args):\n"
    capsys.readouterr()
    assert main(["decode", "--checkpoint", moved, "--prompt", prompt, "--max_new_tokens", "12"]) == 0
    assert len(capsys.readouterr().out) > len(prompt) + 5
    shutil.move(moved, out)

    from nnxlm.serving import Engine, Settings
    from nnxlm.serving.load import load

    served = load(out, max_length=128)
    with Engine(served.model, served.tokenizer, slots=2, max_length=128) as engine:
        ids = served.tokenizer.encode_with_offsets(prompt)[0]
        choice = engine.submit(ids, Settings(max_tokens=12)).result().choices[0]
    assert choice.generated == 12 and choice.text
    greedy = nnxlm.generate(model, jnp.asarray([ids]), max_new_tokens=12)
    assert list(greedy[0]) == [t.id for t in choice.tokens]  # the engine's int8 cache decodes as generate's


def test_bad_quantize_settings_are_one_line(trained_run, tmp_path, capsys):
    out = str(tmp_path / "int8")
    assert main(["quantize", trained_run, out, "--weights", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert main(["quantize", trained_run, out, "--block_size", "100"]) == 2
    assert "block_size 100 does not divide" in capsys.readouterr().err
    assert main(["quantize", trained_run, out]) == 0
    assert main(["quantize", out, str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already quantized" in err and "float run" in err
    assert main(["quantize", trained_run, out]) == 2  # never over a run directory's checkpoints
    assert "already holds checkpoints" in capsys.readouterr().err
    with pytest.raises(nnxlm.errors.UserError, match="already int8"):
        nnxlm.load_model(out, quantize="int8")
    assert main(["convert", "to-hf", out, str(tmp_path / "hf")]) == 2
    assert "int8" in capsys.readouterr().err


def qlora_recipe(base: str, workdir: str, activations=None):
    cfg = nnxlm.checkpointing.load_recipe(base)
    cfg.load_parameters_path, cfg.workdir = base, workdir
    cfg.num_steps, cfg.log_every, cfg.checkpoint_every = 2, 1, 2
    cfg.optimizer.warmup_steps = 0
    nnxlm.recipes.fiddlers.lora(cfg, rank=4, alpha=8)
    if "quantization" in cfg.model.__arguments__:
        cfg.model.quantization.activations = activations
    return cfg


def dequantized_run(trained_run: str, destination: str) -> str:
    """trained_run's model with every kernel replaced by its int8 rounding, as a float run."""
    from nnxlm.checkpointing import find_checkpoint, load_recipe, save_model_checkpoint
    from nnxlm.recipes.serialization import to_json

    model = nnxlm.load_model(trained_run)
    rounded = nnxlm.load_model(trained_run, quantize=Quantization(activations=None))
    for (_, module), (_, twin) in zip(Quantization().targets(model), Quantization().targets(rounded), strict=True):
        module.kernel[...] = twin.float_kernel()
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    _, step = find_checkpoint(trained_run)
    save_model_checkpoint(os.path.join(destination, "checkpoints"), step, params, to_json(load_recipe(trained_run)))
    return destination


def close(a, b) -> bool:
    """Equal up to float rounding, as a whole: Adam turns a gradient of ~1e-9 into a step of the
    learning rate's size either way, so single elements may differ by that much."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))) < 1e-3


def test_qlora_equals_lora_over_the_dequantized_base_and_exports_to_peft(trained_run, tmp_path):
    cfg = qlora_recipe(trained_run, str(tmp_path / "qlora"))
    cfg.model.quantization = fdl.Config(Quantization, activations=None)
    qlora = fdl.build(cfg)
    qlora.fit()
    assert qlora.model.layers[0].attention.q_proj.kernel.dtype == jnp.int8
    reference = fdl.build(qlora_recipe(dequantized_run(trained_run, str(tmp_path / "base")), str(tmp_path / "lora")))
    reference.fit()

    def losses(trainer):
        lines = open(os.path.join(trainer.workdir, "metrics.jsonl")).read().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]

    np.testing.assert_allclose(losses(qlora), losses(reference), rtol=1e-5)
    assert float(jnp.abs(qlora.model.layers[0].attention.q_proj.adapter.b[...]).max()) > 0  # B starts at zero
    adapters = [nnx.to_pure_dict(nnx.state(t.model, nnx.LoRAParam)) for t in (qlora, reference)]
    for a, b in zip(jax.tree.leaves(adapters[0]), jax.tree.leaves(adapters[1]), strict=True):
        assert close(a, b)

    from safetensors.numpy import load_file

    exported = []
    for trainer in (qlora, reference):
        destination = os.path.join(trainer.workdir, "peft")
        assert main(["convert", "to-hf", trainer.workdir, destination, "--adapter"]) == 0
        exported.append(load_file(os.path.join(destination, "adapter_model.safetensors")))
    assert sorted(exported[0]) == sorted(exported[1]) and exported[0]
    for name in exported[0]:
        assert close(exported[0][name], exported[1][name])


def test_full_training_of_int8_weights_is_refused(trained_run, tmp_path):
    cfg = nnxlm.checkpointing.load_recipe(trained_run)
    cfg.workdir = str(tmp_path / "full")
    cfg.model.quantization = fdl.Config(Quantization)
    with pytest.raises(nnxlm.errors.UserError, match="trains int8 weights.*fiddler:lora"):
        fdl.build(cfg).setup()


def test_inspect_reports_the_bytes_of_each_form(capsys):
    import copy

    from nnxlm.recipes.directives import resolve
    from nnxlm.sharding.memory import size

    directives = ["tiny", "set:model.vocab_size=512", "fiddler:lora", "fiddler:quantize(block_size=16)"]
    recipe = resolve(directives)

    def abstract(**quantization):
        cfg = copy.deepcopy(recipe.model)
        cfg.quantization = fdl.Config(Quantization, **quantization) if quantization else None
        return nnx.eval_shape(lambda: fdl.build(cfg)(rngs=nnx.Rngs(0)))

    assert main(["inspect", *(arg for d in directives for arg in ("--recipe", d))]) == 0
    out = capsys.readouterr().out
    cache_tokens = f"KV cache of one row of {recipe.seq_len} tokens"
    assert cache_tokens in out
    for form, label in [
        ({}, "float weights and cache"),
        ({"kv": "int8"}, "int8 weights (float embedding and head) and cache"),
    ]:
        model = abstract(**form)
        assert f"{label}: {size(weight_bytes(model))} + {size(recipe.seq_len * cache_bytes_per_token(model))}\n" in out
    ours = abstract(block_size=16)
    assert f"block_size=16, embed=False, head=False, kv=None): {size(weight_bytes(ours))} + " in out
    assert weight_bytes(ours) < weight_bytes(abstract())
