"""Model recipes: fdl.Partial(Transformer, ...) that the Trainer calls with rngs=.

Each family is one function of its published hyperparameters; sizes are calls of it. A block's
sub-recipes hold only their own numbers (heads, MLP width); the Transformer passes d_model.
"""

import fiddle as fdl

from nnxlm.modules import Attention, DecoderBlock, GatedMLP, RMSNorm, Transformer


def llama(
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    mlp_dim: int,
    head_dim: int | None = None,
    rope_theta: float = 10_000.0,
    norm_eps: float = 1e-5,
    tie_embeddings: bool = False,
) -> fdl.Partial:
    """A Llama-style decoder: RMSNorm pre-norm, rotary GQA, SwiGLU MLP."""
    attention = fdl.Partial(
        Attention,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or d_model // num_heads,
        rope_theta=rope_theta,
    )
    block = fdl.Partial(
        DecoderBlock, attention=attention, mlp=fdl.Partial(GatedMLP, hidden_dim=mlp_dim, activation="silu")
    )
    return fdl.Partial(
        Transformer,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        block=block,
        norm=fdl.Partial(RMSNorm, eps=norm_eps),
        tie_embeddings=tie_embeddings,
    )


def llama2_7b() -> fdl.Partial:
    # 32 x (4 x 4096^2 attention + 3 x 4096 x 11008 MLP) + 2 x 32000 x 4096 = 6.74 B parameters
    return llama(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11_008)


def llama3_8b() -> fdl.Partial:
    # GQA with 8 KV heads and a 128,256-token vocabulary: 8.03 B parameters
    return llama(
        vocab_size=128_256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14_336,
        rope_theta=500_000.0,
    )


def llama_tiny(vocab_size: int = 256) -> fdl.Partial:
    """A 4-layer, 64-wide model for tests and notebooks (about 0.2 M parameters at vocab 256)."""
    return llama(vocab_size=vocab_size, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=192, head_dim=16)
