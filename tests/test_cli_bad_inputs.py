"""Bad inputs to every command: exit 2, one line naming the mistake, no traceback, nothing written.

Each case runs the command line in-process from a workspace of fixtures (text data, a run
directory, checkpoints holding only a recipe, Hugging Face directories without weights). Every
check happens before a model is built or compiled, so the whole table runs in seconds.
"""

import hashlib
import json
import os

import pytest

from nnxlm.cli import main

TINY = ["--recipe", "tiny"]


def _set(*assignments):
    return [arg for assignment in assignments for arg in ("--recipe", f"set:{assignment}")]


def _hf_config(**changes):
    """A Llama config.json of a tiny shape (its weights are never read: the checks come first)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
    }
    return json.dumps({**config, **changes})


# An empty safetensors file: an 8-byte header length and the header {} (padded with spaces).
EMPTY_SAFETENSORS = (8).to_bytes(8, "little") + b"{}      "

# (command line, a piece of the one-line message); paths are relative to the workspace.
CASES = [
    # train: counts, sizes that divide, rates in range, enum values, dtype names (LoRA and SFT check
    # their own settings when the recipe is built, before anything runs)
    (["train", *TINY, *_set("num_steps=0")], "num_steps is 0"),
    (["train", *TINY, *_set("seq_len=0")], "seq_len is 0"),
    (["train", *TINY, *_set("seq_len=64.5")], "seq_len is 64.5: use a whole number"),
    (["train", *TINY, *_set("batch_size=-4")], "batch_size is -4"),
    (["train", *TINY, *_set("grad_accum_steps=3")], "grad_accum_steps is 3: batch_size (8) must divide by it"),
    (["train", *TINY, *_set("eval_every=-1")], "eval_every is -1"),
    (["train", *TINY, *_set("checkpoint_every=-5")], "checkpoint_every is -5"),
    (["train", *TINY, *_set("eval_batches=0")], "eval_batches is 0"),
    (["train", *TINY, *_set("log_every=0")], "log_every is 0"),
    (["train", *TINY, *_set("keep_checkpoints=0")], "keep_checkpoints is 0"),
    (["train", *TINY, *_set("seed=-1")], "seed is -1"),
    (["train", *TINY, *_set("data_shards=3")], "data_shards is 3"),
    (["train", *TINY, *_set("sample_temperature=-0.5")], "sample_temperature is -0.5"),
    (["train", *TINY, *_set("sample_top_p=1.5")], "sample_top_p is 1.5: use a number in (0, 1]"),
    (["train", *TINY, *_set("trainable='('")], "trainable is '('"),
    (["train", *TINY, *_set("mesh={'data': 3}")], "batch_size is 8: the mesh splits it over data (3)"),
    (["train", *TINY, *_set("mesh={'data': -1, 'sequence': 3}")], "seq_len is 64: the mesh splits it over sequence"),
    (["train", *TINY, *_set("mesh={'model': 2}")], "mesh.model is 2: no such mesh axis"),
    (["train", *TINY, *_set("mesh={'data': -1, 'fsdp': -1}")], "at most one axis to -1"),
    (["train", *TINY, *_set("mesh={'data': 0}")], "mesh.data is 0"),
    (["train", *TINY, *_set("sharding_rules={'batch': 'model'}")], "sharding_rules.batch is 'model'"),
    (["train", *TINY, *_set("optimizer.learning_rate=-0.001")], "optimizer.learning_rate is -0.001"),
    (["train", *TINY, *_set("optimizer.warmup_steps=-1")], "optimizer.warmup_steps is -1"),
    (["train", *TINY, *_set("optimizer.decay_steps=0")], "optimizer.decay_steps is 0"),
    (["train", *TINY, *_set("on_nonfinite='ignore'")], "on_nonfinite is 'ignore'"),
    (["train", *TINY, "--resume_step", "3"], "resume_step 3: runs/tiny/checkpoints holds no checkpoint yet"),
    (["train", *TINY, *_set("optimizer.b1=1.0")], "optimizer.b1 is 1.0: use a number in [0, 1)"),
    (["train", *TINY, *_set("optimizer.eps=0.0")], "optimizer.eps is 0.0"),
    (["train", *TINY, *_set("optimizer.weight_decay=-0.1")], "optimizer.weight_decay is -0.1"),
    (["train", *TINY, *_set("optimizer.min_lr_ratio=2.0")], "optimizer.min_lr_ratio is 2.0"),
    (["train", *TINY, *_set("optimizer.clip_norm=0.0")], "optimizer.clip_norm is 0.0"),
    (["train", *TINY, *_set("model.num_layers=0")], "model.num_layers is 0"),
    (["train", *TINY, *_set("model.vocab_size=-1")], "model.vocab_size is -1"),
    (["train", *TINY, *_set("model.remat_policy='some'")], "model.remat_policy is 'some': use one of"),
    (
        ["train", *TINY, *_set("model.block.attention.implementation='flash'")],
        "model.block.attention.implementation is 'flash': use one of 'auto', 'dense', 'blockwise'",
    ),
    (["train", *TINY, *_set("model.block.attention.block_size=0")], "model.block.attention.block_size is 0"),
    (
        ["train", *TINY, *_set("model.block.attention.implementation='cudnn'", "model.block.attention.softcap=50.0")],
        "model.block.attention.softcap is 50.0: cuDNN attention has no soft-cap; use implementation 'blockwise'",
    ),
    (
        ["train", *TINY, *_set("model.block.attention.implementation='splash'", "model.layer_pattern=({},)")],
        "model.block.attention.implementation is 'splash': splash takes a sliding window fixed when the model is built",
    ),
    (["train", *TINY, *_set("model.dtype='fp8'")], "model.dtype is 'fp8'"),
    (["train", *TINY, *_set("model.param_dtype='int32'")], "model.param_dtype is 'int32'"),
    (["train", *TINY, *_set("model.final_logit_softcap=-1.0")], "model.final_logit_softcap is -1.0"),
    (["train", *TINY, *_set("model.num_first_layers=2")], "model.num_first_layers is 2: give a first_block"),
    (["train", *TINY, *_set("model.mtp_depth=-1")], "model.mtp_depth is -1"),
    (["train", *TINY, *_set("model.norm.eps=0.0")], "model.norm.eps is 0.0"),
    (["train", *TINY, *_set("model.block.dropout_rate=1.5")], "model.block.dropout_rate is 1.5"),
    (["train", *TINY, *_set("model.block.attention.num_kv_heads=3")], "num_kv_heads is 3: num_heads (4) must divide"),
    (["train", *TINY, *_set("model.block.attention.num_heads=0")], "model.block.attention.num_heads is 0"),
    (["train", *TINY, *_set("model.block.attention.head_dim=15")], "head_dim is 15: rotary embeddings need an even"),
    (["train", *TINY, *_set("model.block.attention.rope_theta=0.0")], "rope_theta is 0.0"),
    (["train", *TINY, *_set("model.block.attention.sliding_window=0")], "sliding_window is 0"),
    (
        ["train", *TINY, *_set("model.block.attention.rope_scaling={'type': 'dynamic', 'factor': 2.0}")],
        "rope_scaling.type is 'dynamic'",
    ),
    (["train", *TINY, *_set("model.block.mlp.activation='relu'")], "model.block.mlp.activation is 'relu'"),
    (["train", *TINY, *_set("model.block.mlp.hidden_dim=0")], "model.block.mlp.hidden_dim is 0"),
    (["train", *TINY, *_set("train_data.vocab_size=512")], "train_data.vocab_size is 512: use at most the model's"),
    (["train", *TINY, *_set("train_data.split='test'")], "train_data.split is 'test'"),
    (["train", *TINY, *_set("eval_data.eval_fraction=1.0")], "eval_data.eval_fraction is 1.0"),
    (["train", *TINY, *_set("train_data.min_length=300")], "train_data.min_length is 300"),
    (["train", *TINY, "--recipe", "fiddler:lora(rank=0)"], "LoRA rank is 0"),
    (["train", *TINY, "--recipe", "fiddler:lora(targets=('qq',))"], "model.lora.targets is 'qq'"),
    (["train", *TINY, "--recipe", "fiddler:lora(dropout=1.0)"], "LoRA dropout is 1.0"),
    (["train", *TINY, "--recipe", "fiddler:sft('data.jsonl', loss_on='everything')"], "SFT loss_on is 'everything'"),
    (["train", *TINY, "--recipe", "fiddler:sft('data.jsonl', overlong='cut')"], "SFT overlong is 'cut'"),
    (["train", *TINY, *_set("num_steps='many'")], "holds int 20, not str"),  # set:'s own type check
    (["train", *TINY, *_set("model=None")], "holds the recipe's Transformer part, not a value"),
    (["train", *TINY, *_set("model.block.attention=3")], "holds the recipe's Attention part"),
    (["train", *TINY, *_set("optimizer.learning_rate=1e999")], "optimizer.learning_rate is inf"),
    (["train", *TINY, "--workdir", "a.txt"], "the run directory a.txt is a file"),
    (["train", "--recipe", "bad_recipe.py"], "num_kv_heads is 3"),  # a recipe file
    (["train", "--recipe", "bad_recipe.json"], "optimizer.learning_rate is 0.0"),  # a saved recipe
    # inspect: the published recipes' mixture-of-experts, latent attention and layer patterns
    (["inspect", "--recipe", "mixtral_8x7b", *_set("model.block.mlp.num_experts_per_token=9")], "use 1 to num_experts"),
    (["inspect", "--recipe", "mixtral_8x7b", *_set("model.block.mlp.router='topk'")], "router is 'topk'"),
    (["inspect", "--recipe", "mixtral_8x7b", *_set("model.block.mlp.dispatch='sparse'")], "dispatch is 'sparse'"),
    (["inspect", "--recipe", "mixtral_8x7b", *_set("mesh={'expert': 16}")], "num_experts is 8: the mesh's expert"),
    (["inspect", "--recipe", "deepseek_v3", *_set("model.block.mlp.num_groups=3")], "num_groups is 3"),
    (["inspect", "--recipe", "deepseek_v3", *_set("model.block.attention.qk_rope_head_dim=63")], "even size"),
    (
        ["inspect", "--recipe", "deepseek_v3", *_set("model.block.attention.rope_scaling={'type': 'linear'}")],
        "rope_scaling.type is 'linear': MLA takes 'yarn'",
    ),
    (["inspect", "--recipe", "gemma2_2b", *_set("model.layer_pattern=({'window': 64},)")], "layer_pattern.0.window"),
    (["inspect", "--recipe", "gemma2_2b", "--recipe", "fiddler:lora(targets=('q', 'head'))"], "the head is tied"),
    # data show
    (["data", "show", *TINY, *_set("batch_size=0")], "batch_size is 0"),
    (["data", "show", *TINY, "--n", "-1"], "--n is -1"),
    # tokenizer train
    (["tokenizer", "train", *TINY, *_set("train_data.num_documents=0"), "--output", "t.model"], "num_documents is 0"),
    (["tokenizer", "train", "--data", "a.txt", "--vocab_size", "-5", "--output", "t.model"], "vocab_size -5"),
    (
        ["tokenizer", "train", "--data", "a.txt", "--max_chars", "0", "--output", "t.model"],
        "--max_chars 0 is not positive",
    ),
    (["tokenizer", "train", "--data", "a.txt", "--data", "data.jsonl", "--output", "t.model"], "mixes .jsonl"),
    (["tokenizer", "train", "--data", "none/*.txt", "--vocab_size", "600", "--output", "t.model"], "no files match"),
    (["tokenizer", "train", "--data", "a.txt", "--vocab_size", "600", "--output", "a.txt"], "--output a.txt exists"),
    (["tokenizer", "train", *TINY, "--output", "runs/good/tokenizer.model"], "exists: give a new file name"),
    # decode: sampling settings, then the checkpoint's own recipe
    (["decode", "--checkpoint", "runs/good", "--max_new_tokens", "-3"], "--max_new_tokens must be a positive"),
    (["decode", "--checkpoint", "runs/good", "--temperature", "1", "--top_p", "0"], "--top_p must be in (0, 1]"),
    (["decode", "--checkpoint", "runs/good", "--temperature", "nan"], "--temperature must be >= 0"),
    (["decode", "--checkpoint", "runs/tiny", "--prompt", "x"], "no checkpoint found at"),
    (["decode", "--checkpoint", "runs/bad_heads", "--prompt", "x"], "num_kv_heads is 3"),
    (["decode", "--checkpoint", "runs/not_a_recipe", "--prompt", "x"], "has no readable recipe"),
    (["decode", "--checkpoint", "runs/good", "--prompt", "1+\udcff="], "--prompt is not valid UTF-8 text"),
    (["decode", "--checkpoint", "runs/empty_tokenizer", "--prompt", "x"], "runs/empty_tokenizer/tokenizer.model"),
    # quantize: never inside the run it reads
    (["quantize", "runs/good", "runs/good/checkpoints/1"], "checkpoints/1 is a directory that is not empty"),
    (["quantize", "runs/good", "hf"], "is a directory that is not empty"),
    # convert from-hf: the HF directory, then the model its config.json describes
    (["convert", "from-hf", "hf/empty", "out"], "has no config.json"),
    (["convert", "from-hf", "hf/bad_json", "out"], "is not valid JSON"),
    (["convert", "from-hf", "hf/json_list", "out"], "config.json holds a JSON list, not an object of fields"),
    (["convert", "from-hf", "hf/gpt2", "out"], "architecture 'GPT2LMHeadModel' is not supported"),
    (["convert", "from-hf", "hf/no_weights", "out"], "has no model.safetensors"),
    (["convert", "from-hf", "hf/gelu", "out"], "hidden_act='gelu' is not supported"),
    (["convert", "from-hf", "hf/quantized", "out"], "quantization_config (fp8) is not supported"),
    (["convert", "from-hf", "hf/bad_heads", "out"], "num_kv_heads is 3"),
    (["convert", "from-hf", "hf/bad_theta", "out"], "config.json holds a field nnxlm cannot read"),
    (["convert", "from-hf", "hf/bad_context", "out"], "max_position_embeddings='long' is not a context length"),
    # convert to-hf
    (["convert", "to-hf", "runs/nothing_here", "out"], "no checkpoint found at"),
    (["convert", "to-hf", "runs/good", "out", "--adapter", "--merged"], "not allowed with argument"),
    (["convert", "to-hf", "runs/good", "out", "--adapter"], "the model has no LoRA adapters"),
    (["convert", "to-hf", "runs/bad_lr", "out"], "optimizer.learning_rate is -1.0"),
    (["convert", "to-hf", "runs/good", "runs/good"], "runs/good is a directory that is not empty"),
    (["convert", "to-hf", "runs/good", "hf/gelu"], "hf/gelu is a directory that is not empty"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Text data, a run directory with files, checkpoints holding only a recipe, HF directories."""
    import nnxlm
    from nnxlm.recipes.serialization import to_json

    root = tmp_path_factory.mktemp("bad_inputs")

    def write(path, content):
        path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    def checkpoint(name, recipe: str):  # a complete-looking step whose arrays are never read
        for part in ("_CHECKPOINT_METADATA", "state/_METADATA"):
            write(f"runs/{name}/checkpoints/1/{part}", "{}")
        write(f"runs/{name}/checkpoints/1/info/metadata", '{"train_state": false}')
        write(f"runs/{name}/checkpoints/1/state/manifest.ocdbt", b"never read")
        write(f"runs/{name}/checkpoints/1/recipe/metadata", recipe)

    write("a.txt", "def add(a, b):\n    return a + b\n" * 50)
    write("data.jsonl", json.dumps({"prompt": "1 + 1 =", "completion": " 2"}) + "\n")
    write("runs/tiny/recipe.json", json.dumps(to_json(nnxlm.recipes.tiny())))
    write("runs/tiny/metrics.jsonl", '{"step": 10, "loss": 5.0}\n')
    good = nnxlm.recipes.tiny()
    checkpoint("good", json.dumps(to_json(good)))
    good.model.block.attention.num_kv_heads = 3
    checkpoint("bad_heads", json.dumps(to_json(good)))
    write("bad_recipe.json", json.dumps(to_json(nnxlm.recipes.tiny())).replace("0.003", "0.0"))
    bad_lr = nnxlm.recipes.tiny()
    bad_lr.optimizer.learning_rate = -1.0
    checkpoint("bad_lr", json.dumps(to_json(bad_lr)))
    checkpoint("not_a_recipe", "{}")  # JSON, but not a fiddle recipe
    checkpoint("empty_tokenizer", json.dumps(to_json(nnxlm.recipes.tiny())))
    write("runs/empty_tokenizer/tokenizer.model", b"")
    write("runs/good/tokenizer.model", b"a run's tokenizer")
    write(
        "bad_recipe.py",
        "import nnxlm\n\ndef bad_recipe():\n    cfg = nnxlm.recipes.tiny()\n"
        "    cfg.model.block.attention.num_kv_heads = 3\n    return cfg\n",
    )
    (root / "hf" / "empty").mkdir(parents=True)
    write("hf/bad_json/config.json", "{bad")
    write("hf/json_list/config.json", "[1]")
    write("hf/gpt2/config.json", json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    write("hf/no_weights/config.json", _hf_config())
    variants = {
        "gelu": {"hidden_act": "gelu"},
        "quantized": {"quantization_config": {"quant_method": "fp8"}},
        "bad_heads": {"num_key_value_heads": 3},
        "bad_theta": {"rope_theta": "abc"},
        "bad_context": {"max_position_embeddings": "long"},
    }
    for name, changes in variants.items():
        write(f"hf/{name}/config.json", _hf_config(**changes))
        write(f"hf/{name}/model.safetensors", EMPTY_SAFETENSORS)
    return root


def _snapshot(root) -> dict[str, str]:
    """Every file and directory under root, with the hash of each file's bytes."""
    found = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_the_table_has_at_least_45_distinct_bad_inputs():
    assert len({tuple(args) for args, _ in CASES}) == len(CASES) >= 45


def _id(args) -> str:
    return " ".join(arg.removeprefix("set:") for arg in args if arg != "--recipe")[:70]


@pytest.mark.parametrize("args, message", CASES, ids=[_id(args) for args, _ in CASES])
def test_a_bad_input_exits_2_with_one_line_and_changes_no_file(capsys, monkeypatch, workspace, args, message):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("nnxlm: error:") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert _snapshot(workspace) == before  # nothing written, nothing changed


def test_a_closed_stdin_ends_the_prompts_and_bytes_that_are_not_utf8_are_one_line(monkeypatch):
    import io
    import sys

    from nnxlm.cli import _interactive_prompts
    from nnxlm.errors import UserError

    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (<&-)
    assert list(_interactive_prompts()) == []
    stdin = io.TextIOWrapper(io.BytesIO(b"1+\xff=\n"), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(UserError, match="not valid UTF-8 text"):
        list(_interactive_prompts())


def test_a_tokenizer_smaller_than_asked_is_written_and_said(capsys, monkeypatch, tmp_path):
    (tmp_path / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    monkeypatch.chdir(tmp_path)
    assert main(["tokenizer", "train", "--data", "a.txt", "--vocab_size", "4000", "--output", "t.model"]) == 0
    captured = capsys.readouterr()
    written = int(captured.out.split(": ")[1].split()[0])
    assert written < 4000 and f"the text gave {written} of the 4000 tokens asked" in captured.err
