"""DeepSeek-V3 round trip: a tiny model with shapes that expose mapping mistakes (a dense first
layer before two mixture-of-experts layers, 4 expert groups of which 2 are kept, a query LoRA,
qk_rope_head_dim != qk_nope_head_dim != v_head_dim, YaRN with mscale over a prompt and generation
longer than its original context), every weight and router bias perturbed; and DeepSeek's
multi-token prediction layer, which transformers does not load, checked against transformers'
MtpModel, carried in and written back out."""

import json

import fiddle as fdl
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

import nnxlm
from nnxlm.checkpointing import load_recipe
from nnxlm.convert import to_hf
from nnxlm.convert.deepseek_v3 import deepseek_v3_recipe
from nnxlm.errors import UserError
from tests.convert.harness import PROMPT, assert_close_logits, check_round_trip
from tests.modules.helpers import copy_weights

YARN = {
    "rope_type": "yarn",
    "rope_theta": 1000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,  # the 16-token prompt and 20 new tokens run past it
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,  # != mscale_all_dim: cos/sin and the softmax scale both change
    "mscale_all_dim": 1.0,
}
SHAPE = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
    rope_parameters=YARN,
)


def perturb(module, prefix="", seed=0):
    """Every parameter whose name starts with prefix, and the routers' bias buffers, moved off
    their initial values (the bias by enough to change which experts are chosen)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.startswith(prefix) and (name.endswith("e_score_correction_bias") or tensor.requires_grad):
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return module.eval()


def checkpoint_tensors(mtp: MtpModel, layer: int) -> dict[str, np.ndarray]:
    """The prediction layer as DeepSeek's checkpoints hold it: HF layer `layer`, its experts one
    tensor each, its output norm as shared_head.norm, with copies of the embedding and head."""
    prefix, out = f"model.layers.{layer}.", {}
    for name, value in mtp.state_dict().items():
        if not name.startswith("layers.0."):
            continue  # the main model's embedding and head, shared
        name, value = name.removeprefix("layers.0.").removeprefix("mtp_block."), value.numpy()
        if name.endswith("experts.gate_up_proj"):  # transformers' fused [experts, 2 x width, hidden]
            gate, up = np.split(value, 2, axis=1)
            for e in range(value.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e]
        elif name.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = value[e]
        else:
            out[prefix + {"post_norm.weight": "shared_head.norm.weight"}.get(name, name)] = value
    out[prefix + "embed_tokens.weight"] = mtp.embed_tokens.weight.detach().numpy()
    out[prefix + "shared_head.head.weight"] = mtp.shared_head.weight.detach().numpy()
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def test_deepseek_v3_round_trip_with_multi_token_prediction(tmp_path):
    hf_model = DeepseekV3ForCausalLM(DeepseekV3Config(**SHAPE))
    mtp = MtpModel(hf_model, 1)  # shares hf_model's embedding and head
    with torch.no_grad():  # built outside from_pretrained, its experts are left uninitialised
        for name, parameter in mtp.named_parameters():
            if name.startswith("layers."):
                parameter.copy_(torch.randn_like(parameter) * 0.1 if parameter.ndim > 1 else torch.ones_like(parameter))
    perturb(hf_model)
    perturb(mtp, prefix="layers.", seed=1)
    layer = SHAPE["num_hidden_layers"]
    written = checkpoint_tensors(mtp, layer)

    def add_mtp_layer(source):
        tensors = {**load_file(source / "model.safetensors"), **written}
        save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})

    check_round_trip(hf_model, tmp_path, after_save=add_mtp_layer)

    # the prediction layer: depth 1's logits at position i predict token i + 2 from the main
    # model's features at i and the embedding of token i + 1
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        features = hf_model.model(ids).last_hidden_state
        positions = torch.arange(ids.shape[1] - 1)[None]
        hidden = mtp.forward_layer(0, features[:, :-1], positions, None, input_ids=ids[:, 1:])
        expected = mtp._project_to_logits(hidden).numpy()
    model = nnxlm.load_model(str(tmp_path / "run"))
    assert model.mtp_depth == 1 and model.num_first_layers == 1
    _, sown = nnx.capture(model, nnx.Intermediate)(np.array(PROMPT, np.int32))
    mtp_logits = dict(nnx.to_flat_state(sown))[("mtp_logits",)].get_value()[0]
    assert mtp_logits.shape == (1, 1, len(PROMPT[0]), SHAPE["vocab_size"])
    assert_close_logits(np.asarray(mtp_logits[0, :, :-1]), expected)

    exported = load_file(tmp_path / "exported" / "model.safetensors")
    for name, value in written.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["first_k_dense_replace"] == 1
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["n_group"] == 4

    # an unscanned model (both layer stacks as lists) exports the same tensors
    recipe = load_recipe(str(tmp_path / "run")).model
    recipe.scan_layers = False
    looped = nnx.eval_shape(lambda: fdl.build(recipe)(rngs=nnx.Rngs(1)))  # abstract: filled below
    copy_weights(model, looped)
    to_hf(looped, str(tmp_path / "looped"))
    looped_tensors = load_file(tmp_path / "looped" / "model.safetensors")
    assert looped_tensors.keys() == exported.keys()
    for name, value in exported.items():
        np.testing.assert_array_equal(looped_tensors[name], value, err_msg=name)


def test_deepseek_v3_without_query_lora_dense_layers_or_rope_scaling(tmp_path):
    changes = dict(q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1, rope_interleave=False)
    config = DeepseekV3Config(**{**SHAPE, **changes, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}})
    # new_tokens=0: decoding reads queries and latents as the forward pass does (the test above)
    check_round_trip(perturb(DeepseekV3ForCausalLM(config)), tmp_path, new_tokens=0)
    model = nnxlm.load_model(str(tmp_path / "run"))
    assert model.first_layers is None and model.mtp is None


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"first_k_dense_replace": 3}, "first_k_dense_replace=3"),
        ({"n_shared_experts": 0}, "n_shared_experts=0"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
        ({"rope_parameters": {**YARN, "low_freq_factor": 1.0}}, "low_freq_factor"),
    ],
)
def test_unsupported_deepseek_v3_configs_name_the_field(change, field):
    with pytest.raises(UserError, match=field):
        deepseek_v3_recipe({**SHAPE, "hidden_act": "silu", **change})


def test_quantized_checkpoints_are_refused(tmp_path):
    from nnxlm.convert import from_hf

    config = {**SHAPE, "architectures": ["DeepseekV3ForCausalLM"], "quantization_config": {"quant_method": "fp8"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"quantization_config \(fp8\) is not supported"):
        from_hf(str(tmp_path), str(tmp_path / "run"))
