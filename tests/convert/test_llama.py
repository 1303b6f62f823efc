import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from nnxlm.errors import UserError
from tests.convert.harness import TINY_SHAPE, check_round_trip, perturbed


def tiny_llama(**changes):
    config = dict(
        **TINY_SHAPE,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
    )
    return perturbed(LlamaForCausalLM(LlamaConfig(**{**config, **changes})))


def test_llama_round_trip(tmp_path):
    check_round_trip(tiny_llama(), tmp_path)


def test_llama_with_tied_embeddings_round_trip(tmp_path):
    check_round_trip(tiny_llama(tie_word_embeddings=True), tmp_path)


def test_unsupported_field_values_are_named(tmp_path):
    from nnxlm.convert import from_hf

    tiny_llama(hidden_act="relu").save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="hidden_act='relu' is not supported"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))


def test_training_resumes_from_a_converted_checkpoint(tmp_path):
    import fiddle as fdl
    import numpy as np

    from nnxlm.checkpointing import load_recipe
    from nnxlm.convert import from_hf
    from nnxlm.data import Synthetic
    from tests.convert.harness import PROMPT, assert_close_logits, hf_logits

    hf_model = tiny_llama()
    hf_model.save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    recipe = load_recipe(str(tmp_path / "run"))
    recipe.train_data = fdl.Config(Synthetic, vocab_size=101)
    recipe.eval_data = None
    recipe.seq_len, recipe.batch_size, recipe.num_steps, recipe.workdir = 16, 2, 3, str(tmp_path / "run")
    trainer = fdl.build(recipe).setup()
    assert trainer.step == 0
    assert_close_logits(np.asarray(trainer.model(np.array(PROMPT, np.int32))), hf_logits(hf_model, PROMPT))
    history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in history)
    assert sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit()) == [0, 3]


def test_the_command_line_converts_both_ways_and_names_bad_input(tmp_path, capsys):
    import numpy as np
    import torch
    from safetensors import safe_open

    import nnxlm
    from nnxlm.cli import main
    from tests.convert.harness import PROMPT, assert_close_logits, hf_logits

    hf_model = tiny_llama()
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_close_logits(hf_logits(exported, PROMPT), hf_logits(hf_model, PROMPT))
    model = nnxlm.load_model(str(tmp_path / "run"))
    assert model(np.array(PROMPT, np.int32)).shape == (1, len(PROMPT[0]), 101)
    # in bfloat16, as most published models are: half the bytes, and transformers loads it as such
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    halved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert halved.dtype == torch.bfloat16 and halved.config.dtype == torch.bfloat16
    with safe_open(tmp_path / "bf16" / "model.safetensors", "np") as written:  # 2 bytes a weight on disk
        assert {written.get_slice(name).get_dtype() for name in written.keys()} == {"BF16"}
    expected = hf_logits(hf_model, PROMPT)
    assert np.max(np.abs(hf_logits(halved.float(), PROMPT) - expected)) < 0.05 * np.max(np.abs(expected))
    capsys.readouterr()
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "x"), "--dtype", "int4"]) == 2
    assert "--dtype int4 cannot be exported: give one of float32, bfloat16, float16" in capsys.readouterr().err
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "x"), "--base", "org/model"]) == 2
    assert "--base names the base model of an --adapter export" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2  # never overwrite
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "a_file")]) == 2
    assert "the destination" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "x"


LLAMA3_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


def test_llama3_rope_scaling_round_trip(tmp_path):
    import numpy as np

    from nnxlm.modules.rope import inverse_frequencies

    # original context 16 at theta 500: the slow half of head_dim 16 is scaled, the fast kept
    scaled = inverse_frequencies(16, 500.0, {"type": "llama3", **LLAMA3_SCALING})
    assert not np.allclose(scaled, inverse_frequencies(16, 500.0), rtol=1e-3)
    check_round_trip(tiny_llama(rope_parameters={"rope_theta": 500.0, **LLAMA3_SCALING}), tmp_path)
    config = __import__("json").loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"] == {"rope_theta": 500.0, **LLAMA3_SCALING}


def test_older_top_level_rope_fields_are_read():
    from nnxlm.convert.llama import rope_settings

    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_settings(old) == (500000.0, {"type": "linear", "factor": 2.0})
    assert rope_settings({}) == (10_000.0, None)
    with pytest.raises(UserError, match="rope_type='yarn' is not supported"):
        rope_settings({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_an_export_tells_transformers_its_special_token_ids(tmp_path, small_tokenizer):
    """Without eos_token_id in config.json / generation_config.json, transformers' generate never
    stops at the end of a text."""
    from transformers import AutoModelForCausalLM

    from nnxlm.convert import from_hf, to_hf

    tiny_llama().save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    small_tokenizer.save(str(tmp_path / "run" / "tokenizer.model"))
    to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    generation = AutoModelForCausalLM.from_pretrained(tmp_path / "out").generation_config
    expected = (small_tokenizer.bos_id, small_tokenizer.eos_id, small_tokenizer.pad_id)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == expected


@pytest.mark.parametrize("copy", ["equal", "different"])
def test_a_tied_model_saved_with_a_copy_of_its_head_converts_when_the_copy_is_the_embedding(tmp_path, copy):
    """Some exports of a tied model (tie_word_embeddings) write lm_head.weight anyway; transformers
    ties it to the embedding. An equal copy is passed over; another is refused, naming the fix."""
    from nnxlm.convert.hf_files import TensorReader, write_tensors

    def add_head(directory):
        reader = TensorReader(directory)
        tensors = {name: reader.get(name) for name in reader.names()}
        head = tensors["model.embed_tokens.weight"].copy()
        if copy == "different":
            head[0, 0] += 1
        (directory / "model.safetensors").unlink()
        write_tensors(directory, {**tensors, "lm_head.weight": head}.items())

    if copy == "equal":
        check_round_trip(tiny_llama(tie_word_embeddings=True), tmp_path, new_tokens=0, after_save=add_head)
        return
    from nnxlm.convert import from_hf

    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "hf")
    add_head(tmp_path / "hf")
    with pytest.raises(UserError, match="lm_head.weight is not model.embed_tokens.weight: set tie_word_embeddings"):
        from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))


def test_a_model_without_tokenizer_files_converts_and_says_the_run_has_no_tokenizer(tmp_path, capfd):
    from nnxlm.convert import from_hf

    tiny_llama().save_pretrained(tmp_path / "hf")
    from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    assert "has no tokenizer.json or tokenizer.model, so" in capfd.readouterr().err
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "hf" / "tokenizer.json"))
    from_hf(str(tmp_path / "hf"), str(tmp_path / "run2"))
    assert "no tokenizer" not in capfd.readouterr().err
