"""Model recipes: fdl.Partial(Transformer, ...) that the Trainer calls with rngs=.

Each family is one function of its published hyperparameters; sizes are calls of it. A block's
sub-recipes hold only their own numbers (heads, MLP width); the Transformer passes d_model.
"""

import copy

import fiddle as fdl

from nnxlm.modules import Attention, DecoderBlock, GatedMLP, RMSNorm, Transformer
from nnxlm.modules.mla import MLA
from nnxlm.modules.moe import MoE


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
    rope_scaling: dict | None = None,
    qkv_bias: bool = False,
    qk_norm: bool = False,
    sliding_window: int | None = None,
) -> fdl.Partial:
    """A Llama-style decoder: RMSNorm pre-norm, rotary GQA, SwiGLU MLP.

    The attention options (see nnxlm.modules.attention) make the Llama-like families: rope_scaling
    (Llama 3.1+), qkv_bias (Qwen 2.5), qk_norm (an RMSNorm of norm_eps on each head: Qwen 3),
    sliding_window (Mistral). Only options that are on appear in the recipe.
    """
    options = dict(rope_scaling=rope_scaling, qkv_bias=qkv_bias, sliding_window=sliding_window)
    options = {name: value for name, value in options.items() if value}
    if qk_norm:
        options["qk_norm"] = fdl.Partial(RMSNorm, eps=norm_eps)
    attention = fdl.Partial(
        Attention,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim or d_model // num_heads,
        rope_theta=rope_theta,
        **options,
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


def llama3_rope_scaling(factor: float) -> dict:
    """Llama 3.1+ rope scaling of an 8192-token original context (config.json rope_scaling)."""
    return {
        "type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def llama3_1_8b() -> fdl.Partial:
    # Llama 3 8B's shapes with llama3 rope scaling (factor 8) for a 128 K context: 8.03 B parameters
    cfg = llama3_8b()
    cfg.block.attention.rope_scaling = llama3_rope_scaling(8.0)
    return cfg


def llama3_2_1b() -> fdl.Partial:
    # tied embeddings, rope factor 32: 1.24 B parameters
    return llama(
        vocab_size=128_256,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        head_dim=64,
        rope_theta=500_000.0,
        rope_scaling=llama3_rope_scaling(32.0),
        tie_embeddings=True,
    )


def llama3_2_3b() -> fdl.Partial:
    # tied embeddings, rope factor 32: 3.21 B parameters
    return llama(
        vocab_size=128_256,
        d_model=3072,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        mlp_dim=8192,
        head_dim=128,
        rope_theta=500_000.0,
        rope_scaling=llama3_rope_scaling(32.0),
        tie_embeddings=True,
    )


def llama3_3_70b() -> fdl.Partial:
    # 80 layers of 8192, GQA with 8 KV heads, rope factor 8: 70.6 B parameters
    return llama(
        vocab_size=128_256,
        d_model=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        mlp_dim=28_672,
        rope_theta=500_000.0,
        rope_scaling=llama3_rope_scaling(8.0),
    )


def mistral_7b() -> fdl.Partial:
    # Mistral 7B v0.1: GQA with 8 KV heads and a 4096-token sliding window: 7.24 B parameters
    return llama(
        vocab_size=32_000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14_336,
        sliding_window=4096,
    )


def qwen2_5(**shape) -> fdl.Partial:
    """Qwen 2.5: a Llama with q/k/v biases, theta 1e6, eps 1e-6, a 151,936-token vocabulary."""
    return llama(**{"vocab_size": 151_936, **shape}, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True)


def qwen2_5_0_5b() -> fdl.Partial:
    # 0.49 B parameters
    return qwen2_5(d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, mlp_dim=4864, tie_embeddings=True)


def qwen2_5_1_5b() -> fdl.Partial:
    # 1.54 B parameters
    return qwen2_5(d_model=1536, num_layers=28, num_heads=12, num_kv_heads=2, mlp_dim=8960, tie_embeddings=True)


def qwen2_5_7b() -> fdl.Partial:
    # 7.62 B parameters
    return qwen2_5(vocab_size=152_064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4, mlp_dim=18_944)


def qwen3(**shape) -> fdl.Partial:
    """Qwen 3: a Llama with per-head qk RMSNorm, head_dim 128, theta 1e6, eps 1e-6."""
    return llama(vocab_size=151_936, head_dim=128, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True, **shape)


def qwen3_0_6b() -> fdl.Partial:
    # 0.60 B parameters (tied embeddings)
    return qwen3(d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, mlp_dim=3072, tie_embeddings=True)


def qwen3_8b() -> fdl.Partial:
    # 8.19 B parameters
    return qwen3(d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8, mlp_dim=12_288)


def mixtral(*, mlp_dim: int, vocab_size: int = 32_000, num_experts: int = 8, **shape) -> fdl.Partial:
    """Mixtral: a Llama whose MLP is a top-2 mixture of SwiGLU experts (RoPE theta 1e6)."""
    cfg = llama(vocab_size=vocab_size, mlp_dim=mlp_dim, rope_theta=1_000_000.0, norm_eps=1e-5, **shape)
    cfg.block.mlp = fdl.Partial(
        MoE, num_experts=num_experts, num_experts_per_token=2, expert_hidden_dim=mlp_dim, router="softmax"
    )
    return cfg


def mixtral_8x7b() -> fdl.Partial:
    # 32 layers x 8 experts x 3 x 4096 x 14336 = 45.1 B in experts: 46.7 B parameters, 12.9 B active
    return mixtral(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14_336)


def mixtral_8x22b() -> fdl.Partial:
    # 56 layers of 8 experts 16384 wide, 32768-token vocabulary: 141 B parameters, 39 B active
    return mixtral(vocab_size=32_768, d_model=6144, num_layers=56, num_heads=48, num_kv_heads=8, mlp_dim=16_384)


def qwen3_30b_a3b() -> fdl.Partial:
    # 48 layers of 128 experts (8 active, width 768): 30.5 B parameters, 3.3 B active
    cfg = qwen3(d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, mlp_dim=768)
    cfg.block.mlp = fdl.Partial(
        MoE,
        num_experts=128,
        num_experts_per_token=8,
        expert_hidden_dim=768,
        router="softmax",
        normalize_top_k=True,
    )
    return cfg


def gemma(
    *,
    vocab_size: int = 256_000,
    d_model: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    mlp_dim: int,
    head_dim: int = 256,
    rope_theta: float = 10_000.0,
    norm_eps: float = 1e-6,
    tie_embeddings: bool = True,
    post_norms: bool = False,
    qk_norm: bool = False,
    attn_softcap: float | None = None,
    final_logit_softcap: float | None = None,
    query_pre_attn_scalar: float | None = None,
    layer_pattern: tuple[dict, ...] | None = None,
) -> fdl.Partial:
    """A Gemma decoder: embeddings times sqrt(d_model), RMSNorm x * (1 + w), rotary MQA / GQA with
    head_dim 256, tanh-GELU GeGLU, tied head (Gemma 1). Gemma 2 adds post_norms (a norm on each
    branch's output), attention and final-logit soft-capping, query_pre_attn_scalar and a
    layer_pattern of local (sliding-window) and global layers; Gemma 3 adds qk_norm and a local
    RoPE base in the pattern. Only options that are on appear in the recipe."""
    norm = fdl.Partial(RMSNorm, eps=norm_eps, offset=1.0)
    options = dict(softcap=attn_softcap, query_pre_attn_scalar=query_pre_attn_scalar)
    options = {name: value for name, value in options.items() if value}
    if qk_norm:
        options["qk_norm"] = copy.deepcopy(norm)
    attention = fdl.Partial(
        Attention, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rope_theta=rope_theta, **options
    )
    block = fdl.Partial(
        DecoderBlock, attention=attention, mlp=fdl.Partial(GatedMLP, hidden_dim=mlp_dim, activation="gelu_tanh")
    )
    if post_norms:
        block.post_norms = True
    model = fdl.Partial(
        Transformer,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        block=block,
        norm=norm,
        tie_embeddings=tie_embeddings,
        embed_scale=True,
    )
    if final_logit_softcap:
        model.final_logit_softcap = final_logit_softcap
    if layer_pattern:
        model.layer_pattern = layer_pattern
    return model


def gemma_2b() -> fdl.Partial:
    # multi-query attention (1 KV head), tied 256,000-token vocabulary: 2.51 B parameters
    return gemma(d_model=2048, num_layers=18, num_heads=8, num_kv_heads=1, mlp_dim=16_384)


def gemma_7b() -> fdl.Partial:
    # 16 heads of 256 (4096 wide attention on a 3072 model): 8.54 B parameters
    return gemma(d_model=3072, num_layers=28, num_heads=16, num_kv_heads=16, mlp_dim=24_576)


def gemma2(**shape) -> fdl.Partial:
    """Gemma 2: alternating 4096-token local and global layers, soft-capping, post-norms."""
    local_global = ({"sliding_window": 4096}, {"sliding_window": None})
    options = dict(post_norms=True, attn_softcap=50.0, final_logit_softcap=30.0, layer_pattern=local_global)
    return gemma(**{"query_pre_attn_scalar": 256, **options, **shape})


def gemma2_2b() -> fdl.Partial:
    # 2.61 B parameters
    return gemma2(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, mlp_dim=9216)


def gemma2_9b() -> fdl.Partial:
    # 9.24 B parameters
    return gemma2(d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, mlp_dim=14_336)


def gemma2_27b() -> fdl.Partial:
    # head_dim 128, queries scaled by (d_model / num_heads) ** -0.5 = 144 ** -0.5: 27.2 B parameters
    return gemma2(
        d_model=4608,
        num_layers=46,
        num_heads=32,
        num_kv_heads=16,
        mlp_dim=36_864,
        head_dim=128,
        query_pre_attn_scalar=144,
    )


def gemma3(*, sliding_window: int = 1024, rope_scaling: dict | None = None, **shape) -> fdl.Partial:
    """Gemma 3 (text): 5 local layers (window 1024, RoPE base 10,000) to 1 global (base 1e6, with
    rope_scaling on the global layers only), per-head qk RMSNorm, no soft-capping, 262,144 tokens."""
    local = {"sliding_window": sliding_window, "rope_theta": 10_000.0, "rope_scaling": None}
    pattern = (local,) * 5 + ({"sliding_window": None, "rope_theta": 1_000_000.0, "rope_scaling": rope_scaling},)
    return gemma(
        **{"vocab_size": 262_144, "query_pre_attn_scalar": 256, **shape},
        rope_theta=1_000_000.0,
        post_norms=True,
        qk_norm=True,
        layer_pattern=copy.deepcopy(pattern),
    )


def gemma3_1b() -> fdl.Partial:
    # 1.00 B parameters (a 512-token local window)
    return gemma3(d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1, mlp_dim=6912, sliding_window=512)


def gemma3_4b() -> fdl.Partial:
    # the language model of Gemma 3 4B, linear rope factor 8 on global layers: 3.88 B parameters
    return gemma3(
        d_model=2560,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        mlp_dim=10_240,
        rope_scaling={"type": "linear", "factor": 8.0},
    )


def deepseek(
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_dense_layers: int,
    num_heads: int,
    q_lora_rank: int | None,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    mlp_dim: int,
    num_experts: int,
    num_experts_per_token: int,
    expert_hidden_dim: int,
    num_shared_experts: int = 1,
    num_groups: int = 1,
    num_groups_per_token: int = 1,
    routed_scaling_factor: float = 1.0,
    normalize_top_k: bool = True,
    rope_theta: float = 10_000.0,
    rope_scaling: dict | None = None,
    rope_interleave: bool = True,
    norm_eps: float = 1e-6,
    mtp_depth: int = 0,
    dispatch: str = "sorted",
) -> fdl.Partial:
    """DeepSeek-V3: multi-head latent attention (nnxlm.modules.mla) in every layer; a SwiGLU MLP of
    mlp_dim in the first num_dense_layers, then a mixture of experts routed by a sigmoid with a
    bias-corrected, group-limited top-k choice and a routed scaling factor, plus always-on shared
    experts; optional multi-token prediction (mtp_depth). Both blocks share one attention recipe,
    so an override of it changes every layer. MLA keeps its own norms at eps 1e-6, as
    transformers' DeepseekV3Attention does whatever the model's eps."""
    attention = fdl.Partial(
        MLA,
        num_heads=num_heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=qk_nope_head_dim,
        qk_rope_head_dim=qk_rope_head_dim,
        v_head_dim=v_head_dim,
        rope_theta=rope_theta,
        **({"rope_scaling": rope_scaling} if rope_scaling else {}),
        **({} if rope_interleave else {"rope_interleave": False}),
    )
    experts = fdl.Partial(
        MoE,
        num_experts=num_experts,
        num_experts_per_token=num_experts_per_token,
        expert_hidden_dim=expert_hidden_dim,
        router="sigmoid",
        normalize_top_k=normalize_top_k,
        num_shared_experts=num_shared_experts,
        routed_scaling_factor=routed_scaling_factor,
        num_groups=num_groups,
        num_groups_per_token=num_groups_per_token,
        dispatch=dispatch,
    )
    model = fdl.Partial(
        Transformer,
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        block=fdl.Partial(DecoderBlock, attention=attention, mlp=experts),
        norm=fdl.Partial(RMSNorm, eps=norm_eps),
    )
    if num_dense_layers:
        dense = fdl.Partial(GatedMLP, hidden_dim=mlp_dim)
        model.first_block = fdl.Partial(DecoderBlock, attention=attention, mlp=dense)
        model.num_first_layers = num_dense_layers
    if mtp_depth:
        model.mtp_depth = mtp_depth
    return model


def deepseek_v3() -> fdl.Partial:
    # DeepSeek-V3 (and R1): 61 layers, the first 3 dense, then 256 routed experts (8 active) and
    # 1 shared; 671.03 B parameters, 37.5 B active, plus 11.5 B in the multi-token prediction
    # module that only training runs.
    return deepseek(
        vocab_size=129_280,
        d_model=7168,
        num_layers=61,
        num_dense_layers=3,
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mlp_dim=18_432,
        num_experts=256,
        num_experts_per_token=8,
        expert_hidden_dim=2048,
        num_shared_experts=1,
        num_groups=8,
        num_groups_per_token=4,
        routed_scaling_factor=2.5,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        mtp_depth=1,
    )
