"""The DPO objective: closed-form losses, ln 2 at the start, its reference kept frozen."""

import json
import math
import os

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnxlm
from nnxlm.checkpointing import saved_info
from nnxlm.convert import to_hf
from nnxlm.data import JsonlFiles
from nnxlm.errors import UserError
from nnxlm.modules.lora import LoRA
from nnxlm.objectives import NextToken
from nnxlm.objectives.dpo import DPO, dpo_loss
from nnxlm.recipes import models

QUESTIONS = ["Name a list method.", "What does zip do?", "Is 7 prime?", "Say hi.", "Add 2 and 2.", "Why?"]
GOOD = ["append", "It pairs items of iterables.", "Yes.", "hi", "4", "Because."]
BAD = ["banana", "Nothing at all, ever.", "No.", "bye", "5", "No reason"]


def test_closed_form_losses_on_fixed_log_probabilities():
    # log-ratios (policy - reference) of chosen and rejected responses, and their margin z
    chosen, rejected, beta = jnp.array([1.0, -0.5]), jnp.array([0.2, 0.5]), 0.5
    z = chosen - rejected  # [0.8, -1.0]
    sigmoid = [math.log(1 + math.exp(-beta * v)) for v in (0.8, -1.0)]  # -log sigmoid(beta z)
    np.testing.assert_allclose(dpo_loss(z, beta), sigmoid, rtol=1e-6)
    smoothed = [0.9 * s + 0.1 * math.log(1 + math.exp(beta * v)) for s, v in zip(sigmoid, (0.8, -1.0), strict=True)]
    np.testing.assert_allclose(dpo_loss(z, beta, label_smoothing=0.1), smoothed, rtol=1e-6)
    np.testing.assert_allclose(dpo_loss(z, beta, "ipo"), [(0.8 - 1.0) ** 2, (-1.0 - 1.0) ** 2], rtol=1e-6)
    assert float(dpo_loss(jnp.zeros(()), 0.1)) == pytest.approx(0.693147, abs=1e-6)  # ln 2
    assert float(jax.grad(dpo_loss)(0.0, 0.1)) == pytest.approx(-0.05, rel=1e-6)  # -beta / 2


def test_bad_settings_are_one_clear_error():

    cases = [
        ({"loss": "hinge"}, "loss is 'hinge'"),
        ({"beta": 0}, "beta is 0"),
        ({"label_smoothing": 0.5}, "label_smoothing is 0.5"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "sigmoid loss only"),
    ]
    for bad, match in cases:
        with pytest.raises(UserError, match=match):
            DPO(**bad)


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": f"Q: {q}\nA: ", "chosen": g, "rejected": b} for q, g, b in zip(QUESTIONS, GOOD, BAD, strict=True)
    ]
    records.append(
        {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "hi"}],
         "rejected": [{"role": "assistant", "content": "go away"}]}
    )  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_rows_share_the_prompt_and_only_responses_carry_loss(pairs, small_tokenizer):
    source = JsonlFiles(globs=[pairs], field=None)
    settings = dict(seq_len=40, batch_size=14, shuffle=False, repeat=False)
    batch = next(iter(DPO().dataset(source, small_tokenizer, **settings)))
    assert batch["inputs"].shape == (14, 40) and batch["examples"].sum() == 7
    tok = small_tokenizer
    for i, (q, g, b) in enumerate(zip(QUESTIONS, GOOD, BAD, strict=True)):
        prompt = [tok.bos_id, *tok.encode_with_offsets(f"Q: {q}\nA: ")[0]]
        for row, response in ((2 * i, g), (2 * i + 1, b)):
            ids = prompt + tok.encode_with_offsets(response)[0] + [tok.eos_id]
            n = len(ids) - 1
            np.testing.assert_array_equal(batch["inputs"][row, :n], ids[:-1])
            np.testing.assert_array_equal(batch["targets"][row, :n], ids[1:])
            trained = np.flatnonzero(batch["loss_mask"][row])  # the response's tokens and eos, as targets
            np.testing.assert_array_equal(trained, np.arange(len(prompt) - 1, n))
    # a conversation: the prompt's rendering with the assistant header is shared by both rows
    chosen, rejected = batch["inputs"][12], batch["inputs"][13]
    first = int(np.flatnonzero(batch["loss_mask"][12])[0])
    np.testing.assert_array_equal(chosen[: first + 1], rejected[: first + 1])
    assert tok.bos_id not in batch["targets"][12][batch["loss_mask"][12] > 0]


def test_pairs_with_an_implicit_prompt_are_the_pairs_with_it_explicit(small_tokenizer):
    """TRL's implicit-prompt format: chosen and rejected given whole, the prompt being what both
    start with (whole messages of a conversation; whole words of a text)."""
    from nnxlm.data.chat import BUILTIN_TEMPLATE, ChatTemplate
    from nnxlm.data.preferences import pair_tokens

    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    user = [{"role": "user", "content": "Say hi."}]
    good, bad = [{"role": "assistant", "content": "hi"}], [{"role": "assistant", "content": "hide"}]
    cases = [
        ({"chosen": user + good, "rejected": user + bad}, {"prompt": user, "chosen": good, "rejected": bad}),
        ({"chosen": "Q: 2 + 2?\nA: four", "rejected": "Q: 2 + 2?\nA: five"},
         {"prompt": "Q: 2 + 2?\nA:", "chosen": " four", "rejected": " five"}),
    ]  # fmt: skip
    for implicit, explicit in cases:
        assert pair_tokens(implicit, small_tokenizer, template) == pair_tokens(explicit, small_tokenizer, template)
    for same_start in ({"chosen": user, "rejected": user + bad}, {"chosen": "no space", "rejected": "nothing alike"}):
        with pytest.raises(UserError, match="must start with the same prompt .* add the 'prompt' field"):
            pair_tokens(same_start, small_tokenizer, template, where="pairs.jsonl:3")
    with pytest.raises(UserError, match="pairs.jsonl:3: a preference example needs 'chosen' and 'rejected'"):
        pair_tokens({"prompt": "x", "chosen": "y"}, small_tokenizer, template, where="pairs.jsonl:3")


def test_an_odd_batch_of_pairs_is_refused_naming_the_shards_batch(tmp_path, pairs, small_tokenizer):
    cfg = _dpo_recipe(tmp_path, pairs, small_tokenizer, data_shards=2)
    cfg.batch_size = 6
    with pytest.raises(UserError, match=r"a data shard's batch of 3 rows \(batch_size / data_shards\) holds pairs"):
        fdl.build(cfg).setup()


def _dpo_recipe(workdir, pairs, small_tokenizer, **changes):
    from tests.test_trainer import tiny

    small_tokenizer.save(str(workdir / "tokenizer.model"))
    changes = {"checkpoint_every": 0, **changes}
    cfg = tiny(workdir, batch_size=4, seq_len=40, eval_data=None, eval_every=0, **changes)
    cfg.model = models.llama_tiny(vocab_size=1000)
    cfg.train_data = fdl.Config(JsonlFiles, globs=[pairs], field=None)
    cfg.objective = fdl.Config(DPO, beta=0.1)
    cfg.optimizer.learning_rate = 1e-2
    return cfg


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_loss_starts_at_ln_2_and_the_reference_stays_bit_identical(tmp_path, pairs, small_tokenizer, kind):
    cfg = _dpo_recipe(tmp_path, pairs, small_tokenizer, num_steps=12)
    if kind == "lora":
        cfg.model.lora = fdl.Config(LoRA, rank=4)
        cfg.trainable = "lora"
    trainer = fdl.build(cfg).setup()
    start = jax.tree.map(np.asarray, trainer.state["model"])
    assert ("reference" in trainer.state) == (kind == "full")  # with LoRA: the base itself, no copy
    if kind == "full":  # a frozen copy of the starting parameters beside the policy
        reference, model = trainer.state["reference"], trainer.state["model"]
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(model), strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.sharding == b.sharding and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    history = trainer.fit()
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    late = history[-3:]
    assert np.mean([r["margin"] for r in late]) > 0.05 and np.mean([r["accuracy"] for r in late]) > 0.7
    for name in ("reward_chosen", "reward_rejected"):
        assert all(np.isfinite(r[name]) for r in history)
    frozen = trainer.state["reference"] if kind == "full" else trainer.state["model"]
    flat = dict(jax.tree_util.tree_flatten_with_path(start)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        if kind == "full" or "adapter" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(value, flat[path])  # the reference (the base, the copy) never moved


def test_gradient_accumulation_keeps_each_pair_together_and_gives_the_large_batchs_steps(
    tmp_path, pairs, small_tokenizer
):
    runs = {}
    for steps in (1, 2):
        cfg = _dpo_recipe(tmp_path / str(steps), pairs, small_tokenizer, num_steps=3, grad_accum_steps=steps)
        runs[steps] = fdl.build(cfg).fit()
    for field in ("loss", "margin", "accuracy", "grad_norm"):
        np.testing.assert_allclose([r[field] for r in runs[2]], [r[field] for r in runs[1]], rtol=1e-5, atol=1e-6)
    split = _dpo_recipe(tmp_path / "4", pairs, small_tokenizer, num_steps=3, grad_accum_steps=4)
    with pytest.raises(UserError, match="splits the 2-row examples of DPO: make batch_size a multiple of 8"):
        fdl.build(split).setup()


def test_from_a_lora_run_the_reference_is_that_run_and_a_resumed_run_matches(tmp_path, pairs, small_tokenizer):
    from nnxlm.metrics import read_metrics

    sft = _dpo_recipe(tmp_path / "sft", pairs, small_tokenizer, num_steps=6)  # adapters trained away from 0
    sft.model.lora = fdl.Config(LoRA, rank=4)
    sft.trainable = "lora"
    fdl.build(sft).fit()

    def dpo(workdir, steps):
        cfg = _dpo_recipe(workdir, pairs, small_tokenizer, num_steps=steps, checkpoint_every=3)
        cfg.model.lora = fdl.Config(LoRA, rank=4)
        cfg.trainable, cfg.load_parameters_path = "lora", str(tmp_path / "sft")
        cfg.optimizer.decay_steps = 8  # the schedule of the whole run, also for its first part
        return cfg

    whole = fdl.build(dpo(tmp_path / "a", 8)).fit()
    assert whole[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference = the SFT model
    fdl.build(dpo(tmp_path / "b", 5)).fit()
    later = fdl.build(dpo(tmp_path / "b", 8)).fit()  # resumes at step 5, the end of the first part
    assert [r["step"] for r in later] == [6, 7, 8]
    assert [r["loss"] for r in read_metrics(str(tmp_path / "b"))] == [r["loss"] for r in whole]
    # the SFT adapters were merged into the weights these adapters train on: exported alone, they
    # need that merged model as their base (kept through the restart)
    sft_checkpoint = str(tmp_path / "sft" / "checkpoints" / "6")  # the exact weights merged
    assert saved_info(str(tmp_path / "b" / "checkpoints"), 8)["adapter_base"] == sft_checkpoint
    with pytest.raises(UserError, match="with that run's own adapters merged into its weights"):
        to_hf(str(tmp_path / "b"), str(tmp_path / "adapter"), adapter=True)
    to_hf(str(tmp_path / "sft"), str(tmp_path / "sft_merged"), merged=True)
    to_hf(str(tmp_path / "b"), str(tmp_path / "adapter"), adapter=True, base=str(tmp_path / "sft_merged"))
    from peft import AutoPeftModelForCausalLM

    from tests.convert.harness import PROMPT, assert_close_logits, hf_logits

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()  # onto sft_merged
    ours = np.asarray(nnxlm.load_model(str(tmp_path / "b"))(np.array(PROMPT, np.int32)))
    assert_close_logits(ours, hf_logits(peft_model, PROMPT))
    # a run that keeps b's adapters as adapters (no reference: nothing merged) keeps b's base, and a
    # run from b's whole train state too
    for field in ("load_parameters_path", "load_full_state_path"):
        cfg = dpo(tmp_path / field, 9)
        cfg.objective, cfg.load_parameters_path = fdl.Config(NextToken), None
        setattr(cfg, field, str(tmp_path / "b"))
        assert fdl.build(cfg).setup().adapter_base == sft_checkpoint, field


@pytest.mark.parametrize("kind", ["lora"])  # "full" passes too; its cache is tested below and after SIGKILLs
def test_cached_reference_log_probabilities_give_the_uncached_losses_bit_for_bit(
    tmp_path, pairs, small_tokenizer, kind, capfd
):
    from nnxlm.metrics import read_metrics

    def run(workdir, steps, cache):
        workdir.mkdir(exist_ok=True)
        cfg = _dpo_recipe(workdir, pairs, small_tokenizer, num_steps=steps, checkpoint_every=3)
        cfg.objective.cache_reference = cache
        cfg.optimizer.decay_steps = 6
        if kind == "lora":
            cfg.model.lora = fdl.Config(LoRA, rank=4)
            cfg.trainable = "lora"
        return fdl.build(cfg).fit()

    uncached = run(tmp_path / "a", 6, False)
    run(tmp_path / "b", 3, True)  # an epoch is 2 steps: later epochs look the rows up again
    assert "reference log-probabilities of 14 rows computed" in capfd.readouterr().err
    cached = run(tmp_path / "b", 6, True)  # a restart reuses the file
    assert "reference log-probabilities of 14 rows reused" in capfd.readouterr().err
    assert [r["step"] for r in cached] == [4, 5, 6]
    for field in ("loss", "margin", "reward_chosen", "grad_norm"):
        assert [r[field] for r in read_metrics(str(tmp_path / "b"))] == [r[field] for r in uncached], field
    (files,) = [os.listdir(tmp_path / "b" / "reference_logps")]
    assert len(files) == 1


def test_changed_data_or_reference_makes_another_cache(tmp_path, pairs, small_tokenizer, capfd):
    def setup(pairs_path, seed=0):
        cfg = _dpo_recipe(tmp_path, pairs_path, small_tokenizer, num_steps=1, seed=seed)
        cfg.objective.cache_reference = True
        fdl.build(cfg).setup()
        return os.listdir(tmp_path / "reference_logps"), capfd.readouterr().err

    first, err = setup(pairs)
    assert "computed" in err
    again, err = setup(pairs)
    assert again == first and "reused" in err
    changed = tmp_path / "changed.jsonl"
    lines = open(pairs, encoding="utf-8").read().splitlines()
    changed.write_text("\n".join([lines[1], lines[0], *lines[2:]]).replace("banana", "cherry") + "\n", encoding="utf-8")
    second, err = setup(str(changed))
    assert "computed" in err and second != first and len(second) == 1  # the stale file is gone
    third, err = setup(str(changed), seed=1)  # another initialisation: another reference
    assert "computed" in err and third != second
