import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from nnxlm.modules.mlp import GatedMLP
from nnxlm.modules.moe import MoE, RoutingBias, load_balancing_loss
from nnxlm.recipes import models
from tests.modules.helpers import copy_weights

D, F = 16, 8

# DeepSeek-V3 in miniature: 8 experts in 4 groups, 2 groups a token, 2 experts a token, 2 shared
DEEPSEEK = dict(
    num_experts=8,
    num_experts_per_token=2,
    router="sigmoid",
    num_groups=4,
    num_groups_per_token=2,
    routed_scaling_factor=2.5,
    num_shared_experts=2,
)


def tokens(seed=0, shape=(2, 5, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def random_bias(moe, seed=3):
    moe.score_correction_bias[...] = 0.5 * jax.random.normal(jax.random.key(seed), (moe.num_experts,))


def loop_over_chosen_experts(moe, x_btd):
    """The definition: each token's output is the weighted sum of its chosen experts' outputs."""
    x = np.asarray(x_btd, np.float64).reshape(-1, x_btd.shape[-1])
    weights, experts, _ = (np.asarray(a) for a in moe.route(jnp.asarray(x, jnp.float32)))
    gate, up, down = (np.asarray(p.kernel[...], np.float64) for p in (moe.gate, moe.up, moe.down))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], experts[n], strict=True):
            g = x[n] @ gate[e]
            out[n] += w * ((g / (1 + np.exp(-g)) * (x[n] @ up[e])) @ down[e])
    out = out.reshape(x_btd.shape)
    if moe.shared is not None:
        out += np.asarray(moe.shared(x_btd))
    return out


@pytest.mark.parametrize(
    "config",
    [
        dict(num_experts=4, num_experts_per_token=2),
        dict(num_experts=4, num_experts_per_token=3, normalize_top_k=False, routed_scaling_factor=0.5),
        DEEPSEEK,
    ],
    ids=["softmax", "softmax-unnormalised-scaled", "sigmoid-groups-shared"],
)
@pytest.mark.parametrize("dispatch", ["dense", "sorted"])
def test_output_equals_a_loop_over_each_tokens_chosen_experts(config, dispatch):
    moe = MoE(D, expert_hidden_dim=F, dispatch=dispatch, **config, rngs=nnx.Rngs(0))
    if moe.score_correction_bias is not None:
        random_bias(moe)
    x = tokens()
    np.testing.assert_allclose(moe(x), loop_over_chosen_experts(moe, x), rtol=1e-5, atol=1e-5)


def test_sorted_dispatch_equals_dense_in_output_and_gradients():
    dense = MoE(D, expert_hidden_dim=F, **DEEPSEEK, rngs=nnx.Rngs(0))
    random_bias(dense)
    sorted_ = MoE(D, expert_hidden_dim=F, **DEEPSEEK, dispatch="sorted", rngs=nnx.Rngs(0))
    nnx.update(sorted_, nnx.state(dense))
    x = tokens(1, (3, 7, D))

    def loss(moe):
        return jnp.sum(jnp.sin(moe(x)))

    value_dense, grads_dense = nnx.value_and_grad(loss)(dense)
    value_sorted, grads_sorted = nnx.value_and_grad(loss)(sorted_)
    np.testing.assert_allclose(value_sorted, value_dense, rtol=1e-5)
    for g_sorted, g_dense in zip(jax.tree.leaves(grads_sorted), jax.tree.leaves(grads_dense), strict=True):
        np.testing.assert_allclose(g_sorted, g_dense, rtol=1e-4, atol=1e-5)


def test_sorted_is_the_default_dispatch_of_the_layer_and_of_every_moe_recipe():
    assert MoE(D, num_experts=4, num_experts_per_token=2, expert_hidden_dim=F, rngs=nnx.Rngs(0)).dispatch == "sorted"
    for recipe in (models.mixtral_8x7b, models.mixtral_8x22b, models.qwen3_30b_a3b, models.deepseek_v3):
        mlp = recipe().block.mlp
        assert fdl.ordered_arguments(mlp, include_defaults=True)["dispatch"] == "sorted", recipe.__name__


# ---------------------------------------------------------------------------------------------
# Capacity.


def loop_with_capacity(moe, x_btd, capacity):
    """The rule written out: each sequence's slots in token order, an expert's slots beyond
    `capacity` dropped. Returns (output, number of dropped slots)."""
    batch, length, _ = x_btd.shape
    x = np.asarray(x_btd, np.float64).reshape(batch * length, -1)
    weights, experts, _ = (np.asarray(a) for a in moe.route(jnp.asarray(x, jnp.float32)))
    gate, up, down = (np.asarray(p.kernel[...], np.float64) for p in (moe.gate, moe.up, moe.down))
    out, dropped = np.zeros_like(x), 0
    for sequence in range(batch):
        taken = np.zeros(moe.num_experts, int)
        for n in range(sequence * length, (sequence + 1) * length):
            for w, e in zip(weights[n], experts[n], strict=True):
                if taken[e] == capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                g = x[n] @ gate[e]
                out[n] += w * ((g / (1 + np.exp(-g)) * (x[n] @ up[e])) @ down[e])
    out = out.reshape(x_btd.shape)
    if moe.shared is not None:
        out += np.asarray(moe.shared(x_btd))
    return out, dropped


@pytest.mark.parametrize("config", [dict(num_experts=4, num_experts_per_token=2), DEEPSEEK], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
def test_capacity_drops_each_experts_slots_beyond_it_in_token_order(config, dispatch):
    moe = MoE(D, expert_hidden_dim=F, dispatch=dispatch, capacity_factor=0.5, **config, rngs=nnx.Rngs(0))
    if moe.score_correction_bias is not None:
        random_bias(moe)
    x = tokens(5, (3, 9, D))
    capacity = moe.capacity(9)
    assert capacity == -(-9 * 2 // (2 * config["num_experts"]))  # ceil(0.5 * 9 * k / E)
    expected, dropped = loop_with_capacity(moe, x, capacity)
    assert dropped >= 5
    np.testing.assert_allclose(moe(x), expected, rtol=1e-5, atol=1e-5)


def output_value_and_grads(dispatch, capacity_factor, x):
    moe = MoE(D, expert_hidden_dim=F, **DEEPSEEK, dispatch=dispatch, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
    random_bias(moe)
    value, grads = nnx.value_and_grad(lambda moe: jnp.sum(jnp.sin(moe(x))))(moe)
    return moe(x), [value, *jax.tree.leaves(grads)]


def test_a_capacity_that_drops_nothing_equals_dropless():
    x = tokens(6, (3, 9, D))
    out_dropless, grads_dropless = output_value_and_grads("sorted", None, x)
    out, grads = output_value_and_grads("sorted", 4.0, x)  # E / k: every expert may take every token
    np.testing.assert_allclose(out, out_dropless, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, grads_dropless, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_both_dispatches_drop_the_same_slots_in_output_and_gradients():
    x = tokens(6, (3, 9, D))
    out_sorted, grads_sorted = output_value_and_grads("sorted", 0.5, x)
    out_dense, grads_dense = output_value_and_grads("dense", 0.5, x)
    out_dropless, _ = output_value_and_grads("sorted", None, x)
    assert np.abs(np.asarray(out_sorted) - np.asarray(out_dropless)).max() > 1e-2  # something was dropped
    np.testing.assert_allclose(out_sorted, out_dense, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads_sorted, grads_dense, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_one_expert_is_a_gated_mlp(router):
    moe = MoE(D, num_experts=1, num_experts_per_token=1, expert_hidden_dim=F, router=router, rngs=nnx.Rngs(0))
    mlp = GatedMLP(D, hidden_dim=F, rngs=nnx.Rngs(1))
    for name in ("gate", "up", "down"):
        getattr(mlp, name).kernel[...] = getattr(moe, name).kernel[0]
    x = tokens()
    np.testing.assert_allclose(moe(x), mlp(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Against transformers' own MoE blocks, on random weights.


def hf_block(block_class, config):
    torch.manual_seed(0)
    block = block_class(config).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0.0, 0.3)
    return block


def load_hf_weights(moe, block):
    """HF (transformers 5, experts fused): gate.weight [E, D]; experts.gate_up_proj [E, 2F, D] (gate
    rows first); experts.down_proj [E, D, F]; shared_experts.{gate,up,down}_proj.weight (nn.Linear,
    [out, in]); gate.e_score_correction_bias [E]."""
    state = {name: value.detach().numpy() for name, value in block.state_dict().items()}
    f = state["experts.down_proj"].shape[-1]
    moe.router.kernel[...] = state["gate.weight"].T
    moe.gate.kernel[...] = state["experts.gate_up_proj"][:, :f].transpose(0, 2, 1)
    moe.up.kernel[...] = state["experts.gate_up_proj"][:, f:].transpose(0, 2, 1)
    moe.down.kernel[...] = state["experts.down_proj"].transpose(0, 2, 1)
    if "gate.e_score_correction_bias" in state:
        moe.score_correction_bias[...] = state["gate.e_score_correction_bias"]
    if moe.shared is not None:
        for name in ("gate", "up", "down"):
            getattr(moe.shared, name).kernel[...] = state[f"shared_experts.{name}_proj.weight"].T


def assert_matches_hf(moe, block, seed=0):
    x = np.asarray(tokens(seed, (2, 9, D)))
    with torch.no_grad():
        expected = block(torch.tensor(x)).numpy()
    actual = np.asarray(moe(jnp.asarray(x)))
    rel_error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert rel_error < 1e-4, rel_error


@pytest.mark.parametrize("dispatch", ["dense", "sorted"])
def test_matches_transformers_mixtral(dispatch):
    config = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2)
    block = hf_block(MixtralSparseMoeBlock, config)
    moe = MoE(D, num_experts=4, num_experts_per_token=2, expert_hidden_dim=F, dispatch=dispatch, rngs=nnx.Rngs(0))
    load_hf_weights(moe, block)
    assert_matches_hf(moe, block)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_qwen3_moe(norm_topk_prob):
    config = Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=F, num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob
    )
    block = hf_block(Qwen3MoeSparseMoeBlock, config)
    moe = MoE(
        D, num_experts=6, num_experts_per_token=3, expert_hidden_dim=F, normalize_top_k=norm_topk_prob, rngs=nnx.Rngs(0)
    )
    load_hf_weights(moe, block)
    assert_matches_hf(moe, block)


@pytest.mark.parametrize("dispatch", ["dense", "sorted"])
def test_matches_transformers_deepseek_v3(dispatch):
    config = DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=F,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
        norm_topk_prob=True,
    )
    block = hf_block(DeepseekV3MoE, config)
    with torch.no_grad():  # a buffer, not a parameter: randomise it too
        block.gate.e_score_correction_bias.normal_(0.0, 0.5)
    moe = MoE(D, expert_hidden_dim=F, **DEEPSEEK, dispatch=dispatch, rngs=nnx.Rngs(0))
    assert moe.shared.gate.shape == (D, 2 * F)
    load_hf_weights(moe, block)
    assert_matches_hf(moe, block)
    # the bias changes which experts are chosen, not their weights: without it HF and nnxlm differ
    moe.score_correction_bias[...] = jnp.zeros(8)
    with pytest.raises(AssertionError):
        assert_matches_hf(moe, block)


# ---------------------------------------------------------------------------------------------
# Load-balancing loss.


def test_aux_loss_is_num_experts_times_sum_of_fractions_times_mean_probabilities():
    # 4 tokens, k = 1, 2 experts: 3 slots go to expert 0, 1 to expert 1
    experts = jnp.array([[0], [0], [1], [0]])
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    # f = (3/4, 1/4), P = (2.6/4, 1.4/4): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    np.testing.assert_allclose(load_balancing_loss(experts, probs, 2), 1.15, rtol=1e-6)
    # k = 2: slots are counted over tokens x k, so sending every token to both experts is balanced
    both = jnp.array([[0, 1]] * 4)
    np.testing.assert_allclose(load_balancing_loss(both, probs, 2), 1.0, rtol=1e-6)


def test_aux_loss_is_captured_and_is_one_kth_of_transformers_value():
    moe = MoE(D, num_experts=4, num_experts_per_token=2, expert_hidden_dim=F, rngs=nnx.Rngs(0))
    x = tokens(2, (3, 11, D))
    _, captured = nnx.capture(moe, nnx.Intermediate)(x)
    (sown,) = jax.tree.leaves(captured)
    logits = x.reshape(-1, D) @ moe.router.kernel[...]
    hf_loss = load_balancing_loss_func((torch.tensor(np.asarray(logits)),), num_experts=4, top_k=2)
    np.testing.assert_allclose(2 * sown, hf_loss.item(), rtol=1e-5)
    # a uniform router gives exactly 1 whichever experts it picks
    moe.router.kernel[...] = jnp.zeros_like(moe.router.kernel[...])
    np.testing.assert_allclose(jax.tree.leaves(nnx.capture(moe, nnx.Intermediate)(x)[1]), [1.0], rtol=1e-6)


def test_a_call_outside_capture_leaves_the_module_state_unchanged():
    moe = MoE(D, num_experts=4, num_experts_per_token=2, expert_hidden_dim=F, rngs=nnx.Rngs(0))
    before = jax.tree.structure(nnx.state(moe))
    moe(tokens(3, (1, 5, D)))
    moe(tokens(4, (1, 5, D)))
    assert jax.tree.structure(nnx.state(moe)) == before  # generation carries this state in its loop


def moe_model(scan_layers):
    cfg = models.llama_tiny(vocab_size=97)
    cfg.num_layers, cfg.scan_layers = 2, scan_layers
    cfg.block.mlp = fdl.Partial(MoE, num_experts=4, num_experts_per_token=2, expert_hidden_dim=32)
    return fdl.build(cfg)(rngs=nnx.Rngs(0))


def test_aux_loss_of_every_layer_comes_out_of_the_scanned_transformer():
    model = nnx.jit(lambda: moe_model(scan_layers=True))()  # jitted init: faster than eager on CPU
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 97)
    graphdef, state = nnx.split(model)

    @jax.jit
    def train_step(state):  # the Trainer's shape: a pure function of the state
        model = nnx.merge(graphdef, state)

        def loss(model):
            logits, captured = nnx.capture(model, nnx.Intermediate)(ids)
            (aux_l,) = jax.tree.leaves(captured)
            return jnp.mean(logits**2) + 0.01 * jnp.sum(aux_l), aux_l

        (_, aux_l), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return nnx.state(model), aux_l, grads

    new_state, aux_l, grads = train_step(state)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)  # captured: nothing left behind
    assert aux_l.shape == (2,)  # one a layer, stacked by nnx.scan
    assert float(jnp.min(jnp.sum(jnp.abs(grads["layers"]["mlp"]["router"]["kernel"][...]), axis=(1, 2)))) > 0

    # the same numbers outside jax.jit's pure step, scanned and layer by layer unscanned
    listed = nnx.eval_shape(lambda: moe_model(scan_layers=False))
    copy_weights(model, listed)
    forward = nnx.jit(lambda model: nnx.capture(model, nnx.Intermediate)(ids)[1])
    np.testing.assert_allclose(jax.tree.leaves(forward(model)), [aux_l], rtol=1e-5)
    np.testing.assert_allclose(jax.tree.leaves(forward(listed)), aux_l, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Parameters and arguments.


def test_parameters_carry_logical_axes_matching_their_rank():
    moe = MoE(D, expert_hidden_dim=F, router_bias=True, **DEEPSEEK, rngs=nnx.Rngs(0))
    expected = {
        ("router", "kernel"): ("embed", "expert"),
        ("router_bias",): ("expert",),
        ("score_correction_bias",): ("expert",),
        ("gate", "kernel"): ("expert", "embed", "mlp"),
        ("up", "kernel"): ("expert", "embed", "mlp"),
        ("down", "kernel"): ("expert", "mlp", "embed"),
        ("shared", "gate", "kernel"): ("embed", "mlp"),
        ("shared", "up", "kernel"): ("embed", "mlp"),
        ("shared", "down", "kernel"): ("mlp", "embed"),
    }
    found = {}
    for path, variable in nnx.iter_graph(moe):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata()["logical_axes"]
            assert len(axes) == variable[...].ndim, path
            found[tuple(path)] = axes
    assert found == expected
    # the correction bias is model state but not a trainable parameter
    assert isinstance(moe.score_correction_bias, RoutingBias)
    assert not isinstance(moe.score_correction_bias, nnx.Param)
    assert "score_correction_bias" not in nnx.state(moe, nnx.Param)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(router="relu"), "unknown MoE router"),
        (dict(dispatch="gather"), "unknown MoE dispatch"),
        (dict(num_experts_per_token=5), "between 1 and num_experts"),
        (dict(num_groups=2, num_groups_per_token=1), "needs router='sigmoid'"),
        (dict(router="sigmoid", num_groups=3), "multiple of num_groups"),
        (dict(router="sigmoid", num_groups=2, num_groups_per_token=3), "between 1 and num_groups"),
        (dict(router="sigmoid", num_groups=4, num_groups_per_token=1, num_experts_per_token=2), "exceeds"),
        (dict(shared_hidden_dim=8), "num_shared_experts is 0"),
        (dict(capacity_factor=0.0), "capacity_factor is 0.0: use a number > 0"),
        (dict(capacity_factor=-1), "capacity_factor is -1"),
    ],
)
def test_bad_arguments_are_rejected(changes, message):
    kwargs = dict(num_experts=4, num_experts_per_token=2, expert_hidden_dim=F) | changes
    with pytest.raises(ValueError, match=message):
        MoE(D, **kwargs, rngs=nnx.Rngs(0))
