import jax
import jax.numpy as jnp
import numpy as np

from nnxlm.loss import cross_entropy
from nnxlm.optim import AdamW


def test_cross_entropy_sums_unmasked_tokens_and_adds_z_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [4, 0, 1]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    picked = [(0, 0), (0, 1), (1, 0)]
    expected_nll = -np.sum([log_probs[b, t, targets[b, t]] for b, t in picked])
    log_z = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    expected_z = np.sum([log_z[b, t] ** 2 for b, t in picked])
    total, nll, count = cross_entropy(logits, targets, mask, z_loss_weight=1e-2)
    np.testing.assert_allclose(nll, expected_nll, rtol=1e-6)
    np.testing.assert_allclose(total, expected_nll + 1e-2 * expected_z, rtol=1e-6)
    assert count == 3


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    schedule = AdamW(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1).schedule(num_steps=110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.55, atol=1e-6)  # half way down the cosine
    np.testing.assert_allclose(schedule(110), 0.1, atol=1e-6)


def test_clipping_bounds_the_update_of_a_huge_gradient():
    tx, _ = AdamW(learning_rate=1.0, warmup_steps=0, clip_norm=1.0, weight_decay=0.0).build(num_steps=10)
    params = {"w": jnp.zeros((3, 3))}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.full((3, 3), 1e6)}, state, params)
    assert np.all(np.isfinite(updates["w"])) and np.max(np.abs(updates["w"])) <= 1.0 + 1e-6


def _not_decayed(model) -> set[str]:
    from flax import nnx

    from nnxlm.optim import is_decayed

    params = nnx.state(model, nnx.Param)
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", "")) for k in p).strip("/") for p, _ in paths if not is_decayed(p)}


def test_weight_decay_spares_norm_scales_and_biases_whatever_their_rank():
    import fiddle as fdl
    from flax import nnx

    from nnxlm.modules.lora import LoRA
    from nnxlm.recipes import models

    spared = {}
    for scan in (True, False):
        cfg = models.llama_tiny(vocab_size=64)
        cfg.scan_layers = scan
        cfg.block.attention.qkv_bias = True
        cfg.lora = LoRA(rank=2)
        spared[scan] = _not_decayed(fdl.build(cfg)(rngs=nnx.Rngs(0)))
    assert spared[True] == {
        "final_norm/scale", "layers/attention_norm/scale", "layers/mlp_norm/scale",
        "layers/attention/q_bias", "layers/attention/k_bias", "layers/attention/v_bias",
    }  # fmt: skip
    assert {p.split("/", 2)[-1] if p.startswith("layers/") else p for p in spared[False]} == {
        p.removeprefix("layers/") for p in spared[True]
    }  # the looped model's layers/0/..., layers/1/... spare the same parameters
