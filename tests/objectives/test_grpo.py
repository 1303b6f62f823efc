"""The GRPO objective: advantages, the clipped loss and its KL, rewards and their guards, and runs
that sample with the live weights and keep the reference frozen."""

import json

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm import rewards
from nnxlm.data import JsonlFiles
from nnxlm.errors import UserError
from nnxlm.loss import token_logps
from nnxlm.objectives.grpo import GRPO, group_advantages, policy_loss
from nnxlm.recipes import models

WORDS = ["def", "class", "return", "import", "self", "None", "yield", "lambda"]


def test_advantages_are_normalised_within_each_group():
    rewards_pg = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]])
    advantages = group_advantages(rewards_pg)
    std = np.sqrt(4 * 0.25 / 3)  # the sample standard deviation of [1, 0, 0, 1]
    np.testing.assert_allclose(advantages[0], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-12)
    assert np.all(advantages[1:] == 0.0)  # equal rewards teach nothing, exactly (0.1 * 4 / 4 is not 0.1)
    np.testing.assert_array_equal(group_advantages(rewards_pg, scale=False)[0], [0.5, -0.5, -0.5, 0.5])


def test_the_clip_removes_the_gradient_outside_its_range_in_the_direction_it_should():
    eps, old = 0.2, jnp.zeros(())

    def gradient(ratio, advantage):
        loss = lambda logp: policy_loss(logp, old, jnp.float32(advantage), None, 0.0, eps)[0]  # noqa: E731
        return float(jax.grad(loss)(jnp.log(jnp.float32(ratio))))

    # a better than average completion: pushed up until its ratio passes 1 + eps, then left alone
    assert gradient(1.1, 1.0) == pytest.approx(-1.1, rel=1e-6)
    assert gradient(1.5, 1.0) == 0.0
    assert gradient(0.5, 1.0) == pytest.approx(-0.5, rel=1e-6)  # below the range it still rises
    # a worse than average one: pushed down until its ratio falls under 1 - eps
    assert gradient(0.9, -1.0) == pytest.approx(0.9, rel=1e-6)
    assert gradient(0.5, -1.0) == 0.0
    assert gradient(1.5, -1.0) == pytest.approx(1.5, rel=1e-6)  # above the range it still falls
    _, _, clipped = policy_loss(
        jnp.log(jnp.array([1.5, 0.5, 1.5, 1.0])), jnp.zeros(4), jnp.array([1.0, -1.0, -1.0, 1.0]), None, 0.0, eps
    )
    np.testing.assert_array_equal(clipped, [1.0, 1.0, 0.0, 0.0])


def test_the_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logps = jnp.log(jnp.array([0.2, 0.5, 0.9]))
    _, kl, _ = policy_loss(logps, logps, jnp.zeros(3), logps, 0.04, 0.2)
    np.testing.assert_array_equal(kl, jnp.zeros(3))
    reference = jnp.log(jnp.array([0.3, 0.1, 0.95]))
    loss, kl, _ = policy_loss(logps, logps, jnp.zeros(3), reference, 0.04, 0.2)
    r = np.exp(np.asarray(reference) - np.asarray(logps))
    np.testing.assert_allclose(kl, r - np.log(r) - 1, rtol=1e-5)
    assert np.all(np.asarray(kl) > 0)
    np.testing.assert_allclose(loss, 0.04 * kl, rtol=1e-6)  # zero advantages: the penalty alone


def _batch(rows=6, seq_len=12, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (rows, seq_len + 1))
    mask = np.zeros((rows, seq_len), np.float32)
    for row in range(rows):  # a prompt, then a response of a few tokens, then padding
        mask[row, 3 : 3 + 2 + row] = 1.0
    advantages = np.repeat(rng.normal(size=(rows, 1)), seq_len, axis=1).astype(np.float32)
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((rows, seq_len), jnp.int32), "positions": jnp.tile(jnp.arange(seq_len), (rows, 1)),
        "loss_mask": jnp.asarray(mask), "advantages": jnp.asarray(advantages),
    }  # fmt: skip


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_on_policy_without_kl_the_gradient_is_reinforce(aggregation):
    model = fdl.build(models.llama_tiny(vocab_size=64))(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = _batch()
    objective = GRPO(rewards=[rewards.exact_match], beta=0.0, aggregation=aggregation)

    def grpo(params):
        terms = objective.terms(nnx.merge(graphdef, params), batch, None)
        return terms.loss / objective.units(batch)

    def reinforce(params):  # -mean over units of A log pi(completion)
        logps = token_logps(nnx.merge(graphdef, params), batch)
        mask = batch["loss_mask"]
        if aggregation == "sequence":
            mask = mask / jnp.sum(mask, axis=-1, keepdims=True)
        return -jnp.sum(batch["advantages"] * logps * mask) / objective.units(batch)

    expected = jax.tree.leaves(jax.jit(jax.grad(reinforce))(params))
    for got, want in zip(jax.tree.leaves(jax.jit(jax.grad(grpo))(params)), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert float(objective.units(batch)) == (sum(range(2, 8)) if aggregation == "token" else 6)


def test_bad_settings_are_one_clear_error():
    cases = [
        ({"group_size": 1}, "group_size is 1: use at least 2"),
        ({"rewards": []}, "no reward function"),
        ({"rewards": ["exact_match"]}, "is not callable"),
        ({"reward_weights": [1.0, 2.0]}, "1 reward functions and 2 reward_weights"),
        ({"aggregation": "mean"}, "aggregation is 'mean'"),
        ({"temperature": 0.0}, "temperature is 0.0"),
        ({"iterations": 0}, "iterations is 0"),
    ]
    for bad, match in cases:
        with pytest.raises(UserError, match=match):
            GRPO(**{"rewards": [rewards.exact_match], **bad})


def test_rewards_as_trl_takes_them_bools_numpy_scalars_and_arrays():
    prompts, completions = ["p", "q"], ["a", "b"]
    as_bools = lambda prompts, completions: [c == "a" for c in completions]  # noqa: E731
    assert rewards.score(as_bools, prompts, completions, {}, step=0) == [1.0, 0.0]
    as_array = lambda prompts, completions: np.array([0.5, 2.0], np.float32)  # noqa: E731
    assert rewards.score(as_array, prompts, completions, {}, step=0) == [0.5, 2.0]
    as_scalars = lambda prompts, completions: [np.float64(1.5), np.int64(3)]  # noqa: E731
    assert rewards.score(as_scalars, prompts, completions, {}, step=0) == [1.5, 3.0]
    with pytest.raises(UserError, match="returned nan for a completion of prompt 'q'"):
        rewards.score(lambda prompts, completions: [1.0, float("nan")], prompts, completions, {}, step=0)


def test_built_in_rewards():
    prompts, completions = ["p"] * 3, [" 42 ", "41", "def f(): pass"]
    assert rewards.exact_match(prompts, completions, answer=[42, "42", "x"]) == [1.0, 0.0, 0.0]
    assert rewards.regex_match(prompts, completions, pattern=r"\d+") == [1.0, 1.0, 0.0]
    assert rewards.regex_match(prompts, completions, pattern=r"\d+", full=True) == [0.0, 1.0, 0.0]
    assert rewards.length(prompts, ["ab", "abcd", "a" * 8], target=4) == [0.5, 1.0, 0.0]


def test_a_conversations_completions_reach_reward_functions_as_trl_passes_them():
    """A prompt given as messages: each completion is [{"role": "assistant", "content": text}], as
    TRL passes it, so a TRL reward function runs unchanged; the built-in functions read its text."""
    seen = {}

    def trl_style(prompts, completions, answer, **fields):
        seen.update(prompts=prompts, completions=completions)
        return [float(c[0]["content"] == a) for c, a in zip(completions, answer, strict=True)]

    conversation = [{"role": "user", "content": "1 + 1?"}]
    records = [{"prompt": conversation, "answer": "2"}, {"prompt": [*conversation, *conversation], "answer": "4"}]
    got = GRPO(rewards=[trl_style], group_size=2).score(records, ["2", "3", "4", " 4 "], step=0)
    assert seen["prompts"] == [conversation, conversation, records[1]["prompt"], records[1]["prompt"]]
    assert seen["completions"][:2] == [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "3"}]]
    assert got[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]

    built_in = GRPO(rewards=[rewards.exact_match, rewards.length], group_size=2)
    mixed = [records[0], {"prompt": "2 + 2 =", "answer": "4"}]
    got = built_in.score(mixed, ["2", "3", "4", " 4 "], step=0)
    assert got[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]  # exact_match on a message's content and on text
    assert np.allclose(got[:, 1], [0.01, 0.01, 0.01, 0.03])  # length (target 100) of the same


# Reward functions of the kind a recipe file defines (importable: recipes are saved as JSON).
def answer_in_completion(prompts, completions, answer, **fields):
    return [float(str(a) in c) + 0.1 * min(len(c), 5) / 5 for c, a in zip(completions, answer, strict=True)]


def fails_on_some(prompts, completions, answer, **fields):
    return [1.0 / (len(a) % 2) for a in answer]  # words of even length: ZeroDivisionError


def returns_text(prompts, completions, **fields):
    return ["good" for _ in completions]


def constant(prompts, completions, **fields):
    return [1.0] * len(completions)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}:", "answer": w}) + "\n" for w in WORDS), encoding="utf-8")
    return str(path)


def _grpo_recipe(workdir, prompts, small_tokenizer, reward=answer_in_completion, **objective):
    from tests.test_trainer import tiny

    small_tokenizer.save(str(workdir / "tokenizer.model"))
    cfg = tiny(workdir, batch_size=8, seq_len=32, eval_data=None, eval_every=0, num_steps=4, checkpoint_every=0)
    cfg.model = models.llama_tiny(vocab_size=1000)
    cfg.train_data = fdl.Config(JsonlFiles, globs=[prompts], field=None)
    cfg.objective = fdl.Config(GRPO, **{"rewards": [reward], "group_size": 4, "max_new_tokens": 8, **objective})
    cfg.optimizer.learning_rate = 1e-2
    return cfg


def test_a_run_samples_with_the_live_weights_and_keeps_its_reference_frozen(
    tmp_path, prompts, small_tokenizer, monkeypatch
):
    import nnxlm.generation

    cfg = _grpo_recipe(tmp_path, prompts, small_tokenizer, iterations=2)
    trainer = fdl.build(cfg).setup()
    reference = jax.tree.map(np.asarray, trainer.state["reference"])
    sampled_with = []
    generate = nnxlm.generation.generate

    def spy(model, *args, **kwargs):  # the model generation gets: its arrays are the train state's own
        state = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
        live = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(trainer.state["model"])]
        sampled_with.append(state == live)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(nnxlm.generation, "generate", spy)
    history = trainer.fit()
    assert sampled_with == [True] * 4
    for name in ("loss", "kl", "clip_fraction", "reward", "reward_spread", "zero_spread", "completion_length"):
        assert all(np.isfinite(r[name]) for r in history), name
    assert history[0]["kl"] == 0.0  # the policy starts as the reference
    assert all(0 < r["completion_length"] <= 8 for r in history) and history[0]["examples"] == 2
    for a, b in zip(jax.tree.leaves(trainer.state["reference"]), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        (
            fails_on_some,
            r"step 0: reward function fails_on_some raised ZeroDivisionError: .* of prompt 'say (self|None|lambda):'",
        ),
        (returns_text, r"step 0: reward function returns_text returned 'good' for a completion of prompt 'say "),
    ],
)
def test_a_bad_reward_function_is_named_with_the_step_and_prompt(tmp_path, prompts, small_tokenizer, reward, match):
    cfg = _grpo_recipe(tmp_path, prompts, small_tokenizer, reward=reward)
    with pytest.raises(UserError, match=match):
        fdl.build(cfg).fit()


def test_groups_without_reward_spread_stop_the_run(tmp_path, prompts, small_tokenizer):
    cfg = _grpo_recipe(tmp_path, prompts, small_tokenizer, reward=constant, stall_steps=3, beta=0.0)
    trainer = fdl.build(cfg)
    with pytest.raises(UserError, match="step 3: every group's completions have had the same reward for 3 steps"):
        trainer.fit()
    assert "reference" not in trainer.state  # beta 0: no reference is kept


def test_a_batch_that_does_not_hold_whole_groups_is_one_clear_error(tmp_path, prompts, small_tokenizer):
    cfg = _grpo_recipe(tmp_path, prompts, small_tokenizer, group_size=3)
    with pytest.raises(UserError, match="batch_size 8 .* must divide by GRPO group_size 3"):
        fdl.build(cfg).fit()


def test_the_grpo_fiddler_names_built_in_rewards(prompts):
    from nnxlm.recipes.directives import resolve

    cfg = resolve(["tiny", f"fiddler:grpo({prompts!r}, rewards=('exact_match', 'length'), group_size=4)"])
    objective = fdl.build(cfg.objective)
    assert objective.rewards == [rewards.exact_match, rewards.length] and objective.group_size == 4
    assert list(cfg.train_data.globs) == [prompts]
    with pytest.raises(UserError, match="unknown reward 'exact'"):
        resolve(["tiny", f"fiddler:grpo({prompts!r}, rewards=('exact',))"])
