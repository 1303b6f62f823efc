"""Fine-tuning runs: where they start (another run's parameters or state), which parameters train,
and the pretrained model's own tokenizer."""

import json
import os
import signal
import subprocess
import sys
import time

import fiddle as fdl
import jax
import numpy as np
import pytest
from flax import nnx

import nnxlm
from nnxlm.data import PythonStdlib
from nnxlm.metrics import read_metrics
from nnxlm.recipes import fiddlers, models, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [
    {"messages": [{"role": "user", "content": f"Double {i}."}, {"role": "assistant", "content": f"{2 * i}"}]}
    for i in range(40)
]


def pretraining(workdir, **changes) -> fdl.Config:
    """A 4-layer model on stdlib text, with the test tokenizer in its run directory."""
    cfg = trainer(models.llama_tiny(vocab_size=1000), name="base", seq_len=64, batch_size=4, num_steps=4)
    cfg.workdir, cfg.eval_data, cfg.checkpoint_every = str(workdir), None, 4
    cfg.train_data = fdl.Config(PythonStdlib, split="train")
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, small_tokenizer):
    workdir = tmp_path_factory.mktemp("base")
    small_tokenizer.save(str(workdir / "tokenizer.model"))
    base = fdl.build(pretraining(workdir))
    base.fit()
    return workdir, base


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES), encoding="utf-8")
    return str(path)


def fine_tuning(workdir, base_dir, examples, **changes) -> fdl.Config:
    cfg = pretraining(
        workdir, **{"load_parameters_path": str(base_dir), "num_steps": 3, "checkpoint_every": 3, **changes}
    )
    fiddlers.sft(cfg, examples, eval_fraction=0.2)
    fiddlers.lora(cfg, rank=4, alpha=8)
    cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 1e-2, 0
    return cfg


def params(model, which=nnx.Param):
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, which))}


def test_a_lora_run_starts_from_the_base_parameters_and_trains_only_its_adapters(tmp_path, pretrained, examples):
    base_dir, base = pretrained
    run = fdl.build(fine_tuning(tmp_path / "sft", base_dir, examples)).setup()
    assert run.step == 0 and os.path.exists(tmp_path / "sft" / "tokenizer.model")  # the base's own vocabulary
    base_params = params(base.model)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    start = params(run.model, frozen)
    assert start.keys() == base_params.keys()
    for path, value in start.items():
        np.testing.assert_array_equal(value, base_params[path])
    optimizer_paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(run.state["optimizer"]["opt_state"])]
    assert any("adapter" in p for p in optimizer_paths)  # AdamW's moments of the adapters, and of nothing else
    assert not any(name in p for p in optimizer_paths for name in ("kernel", "embedder", "scale"))
    history = run.fit()
    assert all(np.isfinite(r["loss"]) for r in history) and history[-1]["loss"] < history[0]["loss"] + 1.0
    for path, value in params(run.model, frozen).items():  # bit for bit
        np.testing.assert_array_equal(value, start[path])
    moved = [np.abs(v).max() for p, v in params(run.model, nnx.LoRAParam).items() if p[-1] == "b"]
    assert min(moved) > 0  # every adapter's zero factor learned


def test_the_runs_own_checkpoint_takes_priority_over_its_starting_point(tmp_path, pretrained, examples):
    base_dir, _ = pretrained
    fdl.build(fine_tuning(tmp_path / "sft", base_dir, examples)).fit()
    resumed = fdl.build(fine_tuning(tmp_path / "sft", base_dir, examples, num_steps=5)).setup()
    assert resumed.step == 3


def test_the_full_state_of_another_run_continues_its_step_and_optimizer(tmp_path, pretrained):
    base_dir, base = pretrained
    cfg = pretraining(tmp_path / "more", load_full_state_path=str(base_dir), num_steps=6)
    run = fdl.build(cfg).setup()
    assert run.step == 4
    for a, b in zip(jax.tree.leaves(run.state), jax.tree.leaves(base.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert os.path.exists(tmp_path / "more" / "tokenizer.model")


def test_freezing_a_pattern_keeps_those_parameters_and_gives_them_no_optimizer_state(tmp_path, pretrained):
    base_dir, _ = pretrained
    run = fdl.build(pretraining(tmp_path / "frozen", load_parameters_path=str(base_dir), freeze="embedder"))
    run.setup()
    before = np.asarray(run.model.embedder.embedding[...])
    run.fit()
    np.testing.assert_array_equal(run.model.embedder.embedding[...], before)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(run.state["optimizer"]["opt_state"])]
    assert not any("embedder" in p for p in paths) and any("head" in p for p in paths)


def test_nothing_to_train_and_a_base_without_tokenizer_are_one_clear_error(tmp_path, pretrained, examples):
    base_dir, _ = pretrained
    with pytest.raises(nnxlm.UserError, match="trains no parameter"):
        fdl.build(pretraining(tmp_path / "a", trainable="lora")).setup()
    with pytest.raises(nnxlm.UserError, match="not a regular expression"):
        fdl.build(pretraining(tmp_path / "b", freeze="(")).setup()
    tokenless = tmp_path / "tokenless"
    cfg = nnxlm.recipes.tiny()
    cfg.workdir, cfg.num_steps, cfg.checkpoint_every = str(tokenless), 1, 1
    fdl.build(cfg).fit()  # synthetic token ids: no tokenizer
    sft = fine_tuning(tmp_path / "c", tokenless, examples)
    sft.model = nnxlm.recipes.tiny().model
    fiddlers.lora(sft, rank=2)
    with pytest.raises(nnxlm.UserError, match="has no tokenizer: set tokenizer_path"):
        fdl.build(sft).setup()


def test_a_starting_point_of_another_architecture_is_refused_naming_the_parameters(tmp_path, pretrained, examples):
    """Parameters the source lacks would be left unset, and its extra ones silently dropped."""
    base_dir, _ = pretrained
    tied = fine_tuning(tmp_path / "tied", base_dir, examples)
    tied.model.tie_embeddings = True  # the base has a head of its own
    with pytest.raises(nnxlm.UserError, match=r"has head, which the recipe's model lacks; start from a model"):
        fdl.build(tied).setup()
    biased = fine_tuning(tmp_path / "biased", base_dir, examples)
    biased.model.block.attention.qkv_bias = True  # as Qwen 2's
    with pytest.raises(nnxlm.UserError, match=r"it has no layers/attention/k_bias and 2 more; start from"):
        fdl.build(biased).setup()
    lora = fine_tuning(tmp_path / "lora", base_dir, examples)
    fdl.build(lora).fit()
    plain = fine_tuning(tmp_path / "plain", tmp_path / "lora", examples)
    plain.model.lora, plain.trainable = None, "all"
    with pytest.raises(nnxlm.UserError, match=r"holds LoRA adapters .* that the recipe's model lacks"):
        fdl.build(plain).setup()


SFT_RECIPE = """
import fiddle as fdl
from nnxlm.data import PythonStdlib
from nnxlm.recipes import fiddlers, models, trainer


def sft():
    cfg = trainer(models.llama_tiny(vocab_size=1000), name="sft", seq_len=64, batch_size=4, num_steps=40)
    cfg.load_parameters_path = {base!r}
    cfg.checkpoint_every, cfg.eval_every, cfg.log_every = 8, 0, 8
    fiddlers.sft(cfg, {examples!r})
    fiddlers.lora(cfg, rank=4, alpha=8, dropout=0.1)
    return cfg
"""


def test_sigkill_during_sft_with_lora_resumes_to_the_losses_of_an_uninterrupted_run(tmp_path, pretrained, examples):
    base_dir, _ = pretrained
    recipe = tmp_path / "sft.py"
    recipe.write_text(SFT_RECIPE.format(base=str(base_dir), examples=examples))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}

    def command(workdir):
        return [sys.executable, "-m", "nnxlm", "train", "--recipe", str(recipe), "--workdir", str(workdir)]

    subprocess.run(command(tmp_path / "reference"), env=env, check=True, capture_output=True, cwd=REPO)
    victim = subprocess.Popen(command(tmp_path / "killed"), env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "8"
    deadline = time.time() + 120
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(command(tmp_path / "killed"), env=env, capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stderr
    expected = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "reference"))}
    got = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "killed"))}
    assert len(expected) == 40 and [got[s] for s in range(9, 41)] == [expected[s] for s in range(9, 41)]
