"""The SFT objective's loss: the mean NLL of the assistant targets, packed or not, accumulated or not."""

import json

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.data import JsonlFiles
from nnxlm.data.chat import BUILTIN_TEMPLATE, ChatTemplate
from nnxlm.data.sft import example_tokens
from nnxlm.objectives import SFT, NextToken
from nnxlm.recipes import models

QUESTIONS = ["Name a list method.", "What does zip do?", "Is 7 prime?", "Say hi.", "Why?", "Add 2 and 2.", "Ok?"]
ANSWERS = ["append", "It pairs items of iterables.", "Yes, 7 is prime.", "hi", "Because.", "4", "Ok." * 9]


@pytest.fixture(scope="module")
def model():
    recipe = models.llama_tiny(vocab_size=1000)
    return fdl.build(recipe)(rngs=nnx.Rngs(0))


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "sft.jsonl"
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return JsonlFiles(globs=[str(path)], field=None), records


def first_batch(source, tokenizer, **settings):
    settings = dict(seq_len=48, batch_size=2, shuffle=False, repeat=False) | settings
    return {k: jnp.asarray(v) for k, v in next(iter(SFT().dataset(source, tokenizer, **settings))).items()}


def mean_loss(model, batch):
    terms = SFT().terms(model, batch, None)
    return terms.sums["loss"] / SFT().units(batch)


def test_the_loss_is_the_mean_nll_of_the_assistant_targets(model, examples, small_tokenizer):
    source, _ = examples
    batch = first_batch(source, small_tokenizer)
    logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets, mask = np.asarray(batch["targets"]), np.asarray(batch["loss_mask"]) > 0
    by_hand = -np.mean(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0][mask])
    np.testing.assert_allclose(mean_loss(model, batch), by_hand, rtol=1e-5)
    # the labels of prompt tokens do not enter it
    scrambled = {**batch, "targets": jnp.where(batch["loss_mask"] > 0, batch["targets"], 7)}
    np.testing.assert_allclose(mean_loss(model, scrambled), mean_loss(model, batch), rtol=1e-6)


def test_packed_rows_give_each_example_its_loss_alone(model, examples, small_tokenizer):
    source, records = examples
    batch = first_batch(source, small_tokenizer, batch_size=1, seq_len=128)
    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    segments = np.asarray(batch["segment_ids"][0])
    assert len(set(segments.tolist()) - {0}) >= 3  # several examples share the row
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])[0]
    for segment, record in zip(sorted(set(segments.tolist()) - {0}), records, strict=False):
        ids, _ = example_tokens(record, small_tokenizer, template)
        alone = model(jnp.asarray(ids[None, :-1]))[0]
        np.testing.assert_allclose(logits[segments == segment], alone, atol=2e-5, rtol=2e-5)


def test_accumulated_gradients_equal_the_large_batch_on_examples_of_uneven_lengths(tmp_path, examples, small_tokenizer):
    from tests.test_trainer import tiny

    source, _ = examples
    small_tokenizer.save(str(tmp_path / "tokenizer.model"))
    cfg = tiny(tmp_path, grad_accum_steps=4, batch_size=8, seq_len=48, eval_data=None, objective=SFT())
    cfg.model = models.llama_tiny(vocab_size=1000)
    cfg.train_data = fdl.Config(JsonlFiles, globs=[source.globs[0]], field=None)
    trainer = fdl.build(cfg).setup()
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator).items() if k in SFT.batch_fields}
    counts = np.asarray(batch["loss_mask"]).reshape(2, 4, -1).swapaxes(0, 1).reshape(4, -1).sum(-1)
    assert len(set(counts.tolist())) > 1  # micro-batches count different numbers of tokens
    key = jax.random.key(0)

    def gradients(steps):
        trainer.grad_accum_steps = steps
        return jax.jit(lambda b: trainer._gradients(trainer.model, b, key))(batch)

    for a, b in zip(jax.tree.leaves(gradients(4)), jax.tree.leaves(gradients(1)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_next_token_and_sft_share_the_loss_and_differ_in_data(examples, small_tokenizer, model):
    source, _ = examples
    batch = first_batch(source, small_tokenizer)
    assert NextToken().terms(model, batch, None).sums["loss"] == SFT().terms(model, batch, None).sums["loss"]
    assert SFT.batch_fields == NextToken.batch_fields
