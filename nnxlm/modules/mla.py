"""Multi-head latent attention (DeepSeek-V2 / V3), with DeepSeek's YaRN rotary scaling.

Keys and values are not projected from x directly: x is first compressed into one latent vector
per token, kv [kv_lora_rank] (RMS-normalised), from which every head's key part k_nope and value
are expanded by kv_b_proj. Position enters through a separate, small key part k_rope
[qk_rope_head_dim], projected from x alongside the latent and shared by all heads (MQA style), to
which RoPE is applied. A head's key is [k_nope, k_rope], its query [q_nope, q_rope] (RoPE on
q_rope only), so query/key heads have qk_nope_head_dim + qk_rope_head_dim dims and values
v_head_dim. Queries may also go through a low-rank bottleneck (q_lora_rank; None = a plain
projection). What a token leaves behind for decoding is only (kv, k_rope): kv_lora_rank +
qk_rope_head_dim numbers per token and layer, whatever the number of heads (see _latents).

KV cache: MLA caches exactly that, the latent kv and the rotated k_rope of every token (in a
KVCache's k and v, as one kv head), not the expanded keys and values: for DeepSeek-V3 576 numbers
a token and layer instead of 128 heads x (192 + 128) = 40,960, 71x less memory to hold and to read
at every decode step, the resource decoding is bound by. Attending over latents, kv_b_proj is
folded into the queries and outputs ("absorbed": q_nope . (W_k c) = (W_k^T q_nope) . c and
probs (W_v c) = W_v (probs c)), so no step expands the cache: scores are latent queries
[heads, kv_lora_rank] against the cached latents plus q_rope against k_rope, and the
probability-weighted latent goes through W_v once per query. The same numbers as expanding
(up to rounding); without a cache (training) keys and values are expanded, which costs fewer
FLOPs when every token is a query. A long prefill (implementation and length as Attention's)
attends over the latents blockwise: absorbed queries [latent, rope] against one shared key head
[kv, k_rope] with kv as values, never building the [queries x slots] scores. context_parallel
("all_gather" or "ring") is Attention's: ring attention over expanded keys and values.

RoPE layout (rope_interleave, default True as in DeepSeek's checkpoints and transformers'
DeepseekV3Config): the rope dims are rotated as interleaved pairs (x[2i], x[2i+1]) by frequency i;
the rotated vector is returned de-interleaved ([rotated evens, rotated odds]), exactly as
transformers' apply_rotary_pos_emb_interleave does. Queries and keys share the layout, so scores
are those of the interleaved rotation. rope_interleave=False is the half-split layout (x[i],
x[i + r/2]) of nnxlm.modules.rope.

rope_scaling (None, or DeepSeek-V3's {"type": "yarn", ...}; "rope_type" is accepted for "type"):
  factor                           context extension factor s
  original_max_position_embeddings pre-training context length L
  beta_fast, beta_slow             rotation counts bounding the interpolation ramp (default 32, 1)
  mscale, mscale_all_dim           m(s, a) = 0.1 a ln s + 1 (1 for s <= 1): cos and sin are scaled
                                   by m(s, mscale) / m(s, mscale_all_dim) (when both are set, else
                                   m(s, 1)); the softmax scale (qk head dim ** -0.5) by
                                   m(s, mscale_all_dim) ** 2 when mscale_all_dim is set
  attention_factor                 optional: overrides the cos/sin factor above
  truncate                         optional (default True): floor/ceil the ramp bounds
as transformers' _compute_yarn_parameters and DeepseekV3Attention compute them.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.attention import attention_mask
from nnxlm.modules.blockwise import blockwise_cached_attention, check_implementation, use_blockwise
from nnxlm.modules.dense import Dense, fold_key
from nnxlm.modules.flash import blockwise_attention
from nnxlm.modules.fused_attention import KERNELS, check_kernel, fused_attention
from nnxlm.modules.kv_cache import KVCache, cached_attention_mask, empty_layer_kv
from nnxlm.modules.norms import RMSNorm
from nnxlm.modules.ring import check_context_parallel, ring_attention, use_ring

YARN_KEYS = frozenset(
    {
        "type",
        "rope_type",
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    }
)


def _check_scaling(scaling: dict | None) -> None:
    if not scaling:
        return
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"MLA supports rope_scaling of type 'yarn' only, got {kind!r}")
    unknown = set(scaling) - YARN_KEYS
    if unknown:
        raise ValueError(f"unknown yarn rope_scaling keys {sorted(unknown)}; known: {sorted(YARN_KEYS)}")
    for key in ("factor", "original_max_position_embeddings"):
        if scaling.get(key) is None:
            raise ValueError(f"yarn rope_scaling needs {key!r}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek's attention-temperature correction m(s, a) = 0.1 a ln s + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rope_dim: int, theta: float, scaling: dict | None = None) -> tuple[jax.Array, float]:
    """[rope_dim // 2] float32 inverse frequencies (fastest first) and the factor on cos and sin."""
    if rope_dim % 2:
        raise ValueError(f"rotary embedding needs an even qk_rope_head_dim, got {rope_dim}")
    _check_scaling(scaling)
    exponents = jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim
    base_freq = jnp.float32(theta) ** exponents
    extrapolation = 1.0 / base_freq
    if not scaling:
        return extrapolation, 1.0
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    context = float(scaling["original_max_position_embeddings"])

    def correction_dim(rotations):  # the dim index whose wavelength fits `rotations` times in context
        return rope_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = jnp.clip((jnp.arange(rope_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 for the fast dims (extrapolated, kept), 0 for the slow (interpolated)
    inv_freq = (extrapolation / factor) * (1.0 - keep) + extrapolation * keep
    return inv_freq, float(attention_factor)


def softmax_scale(qk_head_dim: int, scaling: dict | None = None) -> float:
    """qk_head_dim ** -0.5, times m(factor, mscale_all_dim) ** 2 under yarn with mscale_all_dim."""
    scale = qk_head_dim**-0.5
    if scaling and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


def apply_mla_rope(
    x_btnr: jax.Array,
    positions_bt: jax.Array,
    theta: float,
    scaling: dict | None = None,
    interleave: bool = True,
) -> jax.Array:
    """Rotates [batch, length, heads, rope_dim] by positions [batch, length] (see the module doc
    for the layouts); the result is scaled by YaRN's attention factor (1 without scaling)."""
    inv_freq, attention_factor = rope_frequencies(x_btnr.shape[-1], theta, scaling)
    angles_btr = positions_bt[..., None].astype(jnp.float32) * inv_freq
    cos = (jnp.cos(angles_btr) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles_btr) * attention_factor)[:, :, None, :]
    x = x_btnr.astype(jnp.float32)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnr.dtype)


class MLA(nnx.Module):
    """Causal multi-head latent attention over packed rows; same call as nnxlm's Attention."""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope_theta: float = 10_000.0,
        rope_scaling: dict | None = None,
        rope_interleave: bool = True,
        norm_eps: float = 1e-6,
        implementation: str = "auto",
        block_size: int = 256,
        context_parallel: str = "all_gather",
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        _check_scaling(rope_scaling)
        check_implementation(implementation, block_size)  # as Attention's (nnxlm.modules.blockwise)
        check_kernel(implementation, block_size=block_size)  # and its fused kernels' (fused_attention)
        self.implementation, self.block_size = implementation, block_size
        check_context_parallel(context_parallel)  # as Attention's (nnxlm.modules.ring)
        self.context_parallel = context_parallel
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = num_heads, q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_theta, self.rope_interleave = rope_theta, rope_interleave
        # a sorted tuple of items: module attributes must be hashable (see the rope_scaling property)
        self._rope_scaling = tuple(sorted(rope_scaling.items())) if rope_scaling else None
        self.scale = softmax_scale(self.qk_head_dim, rope_scaling)
        self.dtype = jnp.dtype(dtype)

        def dense(shape_in, shape_out, axes):
            return Dense(shape_in, shape_out, logical_axes=axes, param_dtype=param_dtype, rngs=rngs)

        def norm(dim):
            return RMSNorm(dim, eps=norm_eps, param_dtype=param_dtype, rngs=rngs)

        if q_lora_rank is None:
            self.q_proj = dense(d_model, (num_heads, self.qk_head_dim), ("embed", "heads", "head_dim"))
        else:
            self.q_a_proj = dense(d_model, q_lora_rank, ("embed", "q_lora"))
            self.q_a_norm = norm(q_lora_rank)
            self.q_b_proj = dense(q_lora_rank, (num_heads, self.qk_head_dim), ("q_lora", "heads", "head_dim"))
        self.kv_a_proj = dense(d_model, kv_lora_rank + qk_rope_head_dim, ("embed", "kv_lora"))
        self.kv_a_norm = norm(kv_lora_rank)
        heads_out = (num_heads, qk_nope_head_dim + v_head_dim)
        self.kv_b_proj = dense(kv_lora_rank, heads_out, ("kv_lora", "heads", "head_dim"))
        self.o_proj = dense((num_heads, v_head_dim), d_model, ("heads", "head_dim", "embed"))

    @property
    def rope_scaling(self) -> dict | None:
        return dict(self._rope_scaling) if self._rope_scaling else None

    def _rope(self, x_btnr: jax.Array, positions_bt: jax.Array) -> jax.Array:
        return apply_mla_rope(x_btnr, positions_bt, self.rope_theta, self.rope_scaling, self.rope_interleave)

    def _queries(self, x_btd: jax.Array, positions_bt: jax.Array, key=None) -> jax.Array:
        """[batch, length, heads, qk_nope_head_dim + qk_rope_head_dim], RoPE on the last part."""
        if self.q_lora_rank is None:
            q_btnh = self.q_proj(x_btd, fold_key(key, 0))
        else:
            q_btnh = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_btd, fold_key(key, 1))), fold_key(key, 2))
        q_nope, q_rope = jnp.split(q_btnh, [self.qk_nope_head_dim], axis=-1)
        return jnp.concatenate([q_nope, self._rope(q_rope, positions_bt)], axis=-1)

    def _latents(self, x_btd: jax.Array, positions_bt: jax.Array, key=None) -> tuple[jax.Array, jax.Array]:
        """What a KV cache keeps per token: the normalised latent kv [batch, length, kv_lora_rank]
        and the rotated shared rope key [batch, length, qk_rope_head_dim]."""
        kv_btc, k_rope_btr = jnp.split(self.kv_a_proj(x_btd, fold_key(key, 3)), [self.kv_lora_rank], axis=-1)
        k_rope_btr = self._rope(k_rope_btr[:, :, None, :], positions_bt)[:, :, 0, :]
        return self.kv_a_norm(kv_btc), k_rope_btr

    def _expand(self, kv_btc: jax.Array, k_rope_btr: jax.Array, key=None) -> tuple[jax.Array, jax.Array]:
        """Latents (of any number of tokens, e.g. a cache's) to keys [batch, length, heads,
        qk_nope_head_dim + qk_rope_head_dim] and values [batch, length, heads, v_head_dim]."""
        k_nope_btnh, v_btnv = jnp.split(self.kv_b_proj(kv_btc, fold_key(key, 4)), [self.qk_nope_head_dim], axis=-1)
        k_rope_btnr = jnp.broadcast_to(k_rope_btr[:, :, None, :], (*k_nope_btnh.shape[:-1], self.qk_rope_head_dim))
        return jnp.concatenate([k_nope_btnh, k_rope_btnr.astype(k_nope_btnh.dtype)], axis=-1), v_btnv

    def _keys_values(self, x_btd: jax.Array, positions_bt: jax.Array, key=None) -> tuple[jax.Array, jax.Array]:
        return self._expand(*self._latents(x_btd, positions_bt, key), key)

    def _attend(self, q_btnh: jax.Array, k_bsnh: jax.Array, v_bsnv: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
        """Softmax attention (float32 logits and softmax), [batch, length, heads, v_head_dim]."""
        logits = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh, preferred_element_type=jnp.float32) * self.scale
        logits = jnp.where(mask_b1ts, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_bsnv.dtype)
        return jnp.einsum("bnts,bsnv->btnv", probs, v_bsnv)

    def _absorbed_queries(self, q_btnh: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Latent queries [batch, length, heads, kv_lora_rank] (W_k folded in), rope queries
        [..., qk_rope_head_dim] and W_v [kv_lora_rank, heads, v_head_dim]."""
        w_k_cnh, w_v_cnv = jnp.split(self.kv_b_proj.weight().astype(q_btnh.dtype), [self.qk_nope_head_dim], axis=-1)
        q_nope_btnh, q_rope_btnr = jnp.split(q_btnh, [self.qk_nope_head_dim], axis=-1)
        return jnp.einsum("btnh,cnh->btnc", q_nope_btnh, w_k_cnh), q_rope_btnr, w_v_cnv

    def _attend_latents_blockwise(self, q_btnh: jax.Array, cache: KVCache, segment_ids_bt: jax.Array) -> jax.Array:
        """_attend_latents blockwise over the cache slots (a long prefill: no [queries x slots]
        scores): [latent query, rope query] of every head against one shared key head [latent,
        k_rope] (multi-query attention), with the latents as values; [batch, length, heads, v_head_dim]."""
        q_latent_btnc, q_rope_btnr, w_v_cnv = self._absorbed_queries(q_btnh)
        latents_b1sc = cache.keys(self.dtype)
        keys_b1sh = jnp.concatenate([latents_b1sc, cache.values(self.dtype)], axis=-1)
        shared = KVCache(keys_b1sh, latents_b1sc, cache.segment_ids, cache.index)
        context_btnc = blockwise_cached_attention(
            jnp.concatenate([q_latent_btnc, q_rope_btnr], axis=-1), shared, segment_ids_bt, scale=self.scale,
            block_q=self.block_size, block_k=self.block_size,
        )  # fmt: skip
        return jnp.einsum("btnc,cnv->btnv", context_btnc, w_v_cnv)

    def _attend_latents(self, q_btnh, kv_bsc, k_rope_bsr, mask_b1ts) -> jax.Array:
        """Attention over cached latents, kv_b_proj absorbed (see the module docstring); the same
        result as _attend over _expand(kv, k_rope); with a LoRA adapter, its update is absorbed too."""
        q_latent_btnc, q_rope_btnr, w_v_cnv = self._absorbed_queries(q_btnh)
        logits = jnp.einsum("btnc,bsc->bnts", q_latent_btnc, kv_bsc, preferred_element_type=jnp.float32)
        logits += jnp.einsum("btnr,bsr->bnts", q_rope_btnr, k_rope_bsr, preferred_element_type=jnp.float32)
        logits = jnp.where(mask_b1ts, logits * self.scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(kv_bsc.dtype)
        context_btnc = jnp.einsum("bnts,bsc->btnc", probs, kv_bsc)
        return jnp.einsum("btnc,cnv->btnv", context_btnc, w_v_cnv)

    def init_cache(self, batch: int, max_length: int) -> tuple[jax.Array, jax.Array]:
        """Empty latents kv [batch, 1, max_length, kv_lora_rank] and rope keys [batch, 1,
        max_length, qk_rope_head_dim] (a KVCache's k and v, as one kv head) in the compute dtype."""
        kv = empty_layer_kv(batch, max_length, 1, self.kv_lora_rank, self.dtype)
        return kv, empty_layer_kv(batch, max_length, 1, self.qk_rope_head_dim, self.dtype)

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        segment_ids_bt: jax.Array,
        cache: KVCache | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Attention within x [batch, length, d_model]: causal, within each packed segment. With a
        cache (this layer's latents, the key segment ids with x's already written at cache.index):
        returns (output, cache with x's latents written), attending over every cached slot.
        dropout_key: of the projections' LoRA dropout (training)."""
        x = x_btd.astype(self.dtype)
        q_btnh = self._queries(x, positions_bt, dropout_key)
        if cache is None:
            k_btnh, v_btnv = self._keys_values(x, positions_bt, dropout_key)
            if use_ring(self.context_parallel, *x.shape[:2]):
                out_btnv = ring_attention(
                    q_btnh, k_btnh, v_btnv, segment_ids_bt, positions_bt, scale=self.scale,
                    block_size=self.block_size,
                )  # fmt: skip
            elif self.implementation in KERNELS:  # v_head_dim may differ: see fused_attention's table
                out_btnv = fused_attention(
                    self.implementation, q_btnh, k_btnh, v_btnv, segment_ids_bt, positions_bt, scale=self.scale,
                    block_size=self.block_size,
                )  # fmt: skip
            elif use_blockwise(self.implementation, x.shape[1]):
                out_btnv = blockwise_attention(
                    q_btnh, k_btnh, v_btnv, segment_ids_bt, positions_bt, scale=self.scale,
                    block_size=self.block_size,
                )  # fmt: skip
            else:
                out_btnv = self._attend(q_btnh, k_btnh, v_btnv, attention_mask(segment_ids_bt))
            return self.o_proj(out_btnv, fold_key(dropout_key, 5))
        kv_btc, k_rope_btr = self._latents(x, positions_bt)
        cache = cache.write(kv_btc[:, None], k_rope_btr[:, None])
        if use_blockwise(self.implementation, x.shape[1], cached=True):
            return self.o_proj(self._attend_latents_blockwise(q_btnh, cache, segment_ids_bt)), cache
        mask = cached_attention_mask(segment_ids_bt, cache.segment_ids, cache.index)
        latents, k_rope = cache.keys(self.dtype)[:, 0], cache.values(self.dtype)[:, 0]
        out_btnv = self._attend_latents(q_btnh, latents, k_rope, mask)
        return self.o_proj(out_btnv), cache
