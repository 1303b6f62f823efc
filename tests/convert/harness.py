"""Round trip of one HF model through nnxlm: import, compare logits and greedy tokens, export,
reload with transformers, compare again."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import nnxlm
from nnxlm.convert import from_hf, to_hf

# Shapes that expose mapping mistakes: 2 KV heads under 4 query heads, head_dim 16 != 48 / 4.
TINY_SHAPE = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
PROMPT = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79]]


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight (norms included) moved off its initial value, so a mapping mistake shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def assert_close_logits(got, expected) -> None:
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(got - expected)) / scale < 1e-3, np.max(np.abs(got - expected)) / scale


def check_round_trip(hf_model, tmp_path, new_tokens: int = 20, prompt=PROMPT, after_save=None) -> None:
    """after_save(directory), if given, edits the saved HF checkpoint before it is converted;
    new_tokens=0 skips the greedy generation (for variants whose decoding another test covers)."""
    source, run_dir, exported = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    hf_model.save_pretrained(source)
    if after_save is not None:
        after_save(source)
    from_hf(str(source), str(run_dir))
    model = nnxlm.load_model(str(run_dir))
    expected = hf_logits(hf_model, prompt)
    assert_close_logits(np.asarray(model(np.array(prompt, np.int32))), expected)

    if new_tokens:
        hf_model.generation_config.eos_token_id = None  # nnxlm.generate without eos_id never stops early
        with torch.no_grad():
            hf_tokens = hf_model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=new_tokens)
        hf_tokens = hf_tokens[:, len(prompt[0]) :]
        np.testing.assert_array_equal(nnxlm.generate(model, prompt, max_new_tokens=new_tokens), hf_tokens.numpy())

    to_hf(str(run_dir), str(exported))
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert_close_logits(hf_logits(reloaded, prompt), expected)
    context = hf_model.config.max_position_embeddings  # the model's context survives the round trip
    assert model.context_length == context == reloaded.config.max_position_embeddings
