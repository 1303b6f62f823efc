"""Fused attention kernels that JAX ships: cuDNN flash attention (GPU) and Pallas splash (TPU).

Attention and MLA take implementation="cudnn" or "splash" for attention without a cache
(training, evaluation, scoring); with a KV cache (generation) they keep their cached path. The
choice is explicit: "auto" never picks a fused kernel, and a kernel never falls back silently.
What a kernel cannot honour is refused with one line naming the fix: what the recipe shows (a
soft-cap with cuDNN, splash's block size, splash under a layer_pattern) by the recipe check and the
modules' constructors (kernel_problem, PATTERN_FIX), the rest at the first call (the platform,
cuDNN's dtype, a traced window).

What each kernel honours, against the dense path (nnxlm.modules.attention.attention_mask):

  ==========================  ==========================================  ====================================
                              "cudnn" (jax.nn.dot_product_attention,       "splash" (jax.experimental.pallas.
                              implementation="cudnn")                      ops.tpu.splash_attention)
  ==========================  ==========================================  ====================================
  platform                    GPU with cuDNN (bfloat16 / float16 only)     TPU
  causal                      is_causal (masked blocks are skipped)        CausalMask (masked blocks skipped)
  packed segment ids          yes, as a boolean [batch, 1, len, len] mask  yes, natively (SegmentIds): no
                              (cuDNN adds it as a bias: quadratic memory,  quadratic memory
                              and the backward pass writes its gradient)
  sliding window (static)     local_window_size                            LocalMask (blocks skipped)
  window per layer (traced:   folded into the mask                         refused (PATTERN_FIX): its masks
  a layer_pattern's)                                                       are fixed when the kernel is built
  GQA / MQA                   natively                                     natively (the MHA kernel reads kv
                                                                           head h // group)
  soft-cap                    refused (no such option)                     attn_logits_soft_cap
  value dim != query dim      q, k or v zero-padded to the larger dim      natively
  (MLA)                       (exact; costs the padding)
  mesh                        jax's own partitioning of the cuDNN call     shard_map over batch (and heads
                                                                           when query and kv heads both split)
  ==========================  ==========================================  ====================================

Windows: the dense path counts a window in positions (query position - key position < window);
both kernels count row indices. Inside one packed document, whose positions rise by one a token,
the two agree; across documents the segment mask already separates tokens. Only padding tokens
(segment 0, whose positions may repeat) can attend differently, and their outputs are masked out
of every loss.

The Pallas TPU flash kernel (jax.experimental.pallas.ops.tpu.flash_attention) is not offered:
splash covers everything it does plus GQA, windows and soft-caps.

INTERPRET is a test hook, not a recipe field: tests set it to run both kernels on CPU (splash in
Pallas interpret mode; cuDNN's call through jax.nn.dot_product_attention(implementation="xla"),
the same arguments on XLA) without the platform check.
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from nnxlm.errors import UserError
from nnxlm.sharding.rules import active_mesh, fit_spec, logical_to_spec

KERNELS = ("cudnn", "splash")
PLATFORMS = {"cudnn": "gpu", "splash": "tpu"}
# splash computes blocks of keys 128 lanes wide (its NUM_LANES): its blocks must be multiples of it
SPLASH_LANES = 128

# Any layer_pattern passes each layer's window as a traced array (nnxlm.modules.transformer):
# splash, whose masks are numpy arrays built with the kernel, cannot take it.
PATTERN_FIX = (
    "splash takes a sliding window fixed when the model is built, and a layer_pattern passes each layer's "
    "window at run time: use implementation 'blockwise' (any platform) or 'cudnn' (GPU)"
)

# Tests only (see the module docstring): run the kernels on CPU, skipping the platform check.
INTERPRET = False


def kernel_problem(implementation: str, *, block_size=None, softcap=None) -> tuple[str, object, str] | None:
    """(field, value, fix) of a setting `implementation` cannot honour, known before any call; None
    when there is none (and for the non-fused implementations)."""
    if implementation == "cudnn" and softcap is not None:
        fix = "cuDNN attention has no soft-cap; use implementation 'blockwise' (or 'splash' on TPU)"
        return "softcap", softcap, fix
    if implementation == "splash" and isinstance(block_size, int) and block_size % SPLASH_LANES:
        rounded = _round_up(block_size, SPLASH_LANES)
        return "block_size", block_size, f"splash takes blocks in multiples of {SPLASH_LANES} tokens; use {rounded}"
    return None


def check_kernel(implementation: str, *, block_size=None, softcap=None) -> None:
    """UserError naming the setting a fused kernel cannot honour (see kernel_problem)."""
    problem = kernel_problem(implementation, block_size=block_size, softcap=softcap)
    if problem is not None:
        field, value, fix = problem
        raise UserError(f"attention {field} {value!r} with implementation {implementation!r}: {fix}")


def fused_attention(
    implementation: str,
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskv: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    block_size: int = 256,
) -> jax.Array:
    """Causal self-attention through the kernel `implementation` ("cudnn" or "splash"), shapes as
    nnxlm.modules.flash.blockwise_attention's; UserError when this platform lacks the kernel."""
    if not INTERPRET:
        _check_platform(implementation)
    if implementation == "cudnn":
        return cudnn_attention(
            q_btnh, k_bskh, v_bskv, segment_ids_bt, positions_bt, scale=scale, window=window, softcap=softcap,
            implementation="xla" if INTERPRET else "cudnn",
        )  # fmt: skip
    return splash_attention(
        q_btnh, k_bskh, v_bskv, segment_ids_bt, positions_bt, scale=scale, window=window, softcap=softcap,
        block_size=block_size, interpret=INTERPRET,
    )  # fmt: skip


def _check_platform(implementation: str) -> None:
    platform = jax.default_backend()
    if platform == PLATFORMS[implementation]:
        return
    other = [name for name, where in PLATFORMS.items() if where == platform]
    fix = f"'{other[0]}' ({platform}), or " if other else ""
    raise UserError(
        f"attention implementation {implementation!r} is a {PLATFORMS[implementation].upper()} kernel and this "
        f"run is on {platform}: use implementation {fix}'auto' / 'blockwise' (any platform)"
    )


def _static_window(window, length: int, implementation: str) -> int | None:
    """The window as a Python int (None when it cannot bind within `length` tokens), or the string
    "traced" for a window known only at run time (a layer_pattern's)."""
    if window is None:
        return None
    try:
        window = int(window)
    except jax.errors.ConcretizationTypeError:
        return "traced"
    if window < 1:
        raise UserError(f"attention window {window} with implementation {implementation!r}: use a window of 1 or more")
    return None if window >= length else window


def cudnn_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskv: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """jax.nn.dot_product_attention with the dense path's mask in the kernel's terms: is_causal,
    a static window as local_window_size, segment ids (and a traced window) as a boolean mask.
    `implementation` is jax's ("cudnn"; "xla" runs the same call anywhere, for tests)."""
    check_kernel("cudnn", softcap=softcap)
    if implementation == "cudnn" and q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(
            f"attention implementation 'cudnn' takes bfloat16 or float16 and the model computes in {q_btnh.dtype}: "
            "set the model's dtype='bfloat16', or use implementation 'auto' / 'blockwise'"
        )
    length = q_btnh.shape[1]
    static_window = _static_window(window, length, "cudnn")
    mask_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    if static_window == "traced":  # the kernel takes only a static window: this one joins the mask
        mask_btt &= positions_bt[:, :, None] - positions_bt[:, None, :] < window
        static_window = None
    # jax.nn.dot_product_attention takes one head dim for q, k and v; zeros added to q and k leave
    # the scores unchanged, zeros added to v add output dims that are cut off again
    qk_dim, v_dim = q_btnh.shape[-1], v_bskv.shape[-1]
    dim = max(qk_dim, v_dim)

    def widened(x):
        return jnp.pad(x, [(0, 0)] * 3 + [(0, dim - x.shape[-1])]) if x.shape[-1] < dim else x

    out_btnh = jax.nn.dot_product_attention(
        widened(q_btnh), widened(k_bskh), widened(v_bskv), mask=mask_btt[:, None], scale=scale, is_causal=True,
        # (left, right) keys around the query, inclusive: `window` keys counting the query itself
        local_window_size=None if static_window is None else (static_window - 1, 0),
        implementation=implementation,
    )  # fmt: skip
    return out_btnh[..., :v_dim]


def splash_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskv: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    *,
    scale: float,
    window=None,
    softcap: float | None = None,
    block_size: int = 256,
    interpret: bool = False,
) -> jax.Array:
    """Splash attention over each batch row (a vmap of the single-device kernel). Under a mesh
    (nnxlm.sharding.rules.active_mesh) it runs in shard_map: Mosaic kernels are not partitioned
    by XLA. positions are unused: windows count row indices (see the module docstring)."""
    del positions_bt
    check_kernel("splash", block_size=block_size, softcap=softcap)
    static_window = _static_window(window, q_btnh.shape[1], "splash")
    if static_window == "traced":
        raise UserError(f"attention implementation 'splash' with a traced window: {PATTERN_FIX}")

    def attend(q_btnh, k_bskh, v_bskv, segment_ids_bt):
        return _splash_local(
            q_btnh, k_bskh, v_bskv, segment_ids_bt, scale, static_window, softcap, block_size, interpret
        )

    active = active_mesh()
    if active is None or active[0].size == 1:
        return attend(q_btnh, k_bskh, v_bskv, segment_ids_bt)
    mesh, rules = active
    wanted = logical_to_spec(("batch", None, "heads", None), rules)
    q_spec, k_spec, v_spec = (fit_spec(x.shape, wanted, mesh) for x in (q_btnh, k_bskh, v_bskv))
    if not q_spec[2] == k_spec[2] == v_spec[2]:
        # a kv head count the mesh cannot split like the query heads: each device keeps every head,
        # so that query head h still finds its kv head at h // group
        q_spec, k_spec, v_spec = (PartitionSpec(spec[0], None, None, None) for spec in (q_spec, k_spec, v_spec))
    attend = jax.shard_map(
        attend, mesh=mesh, in_specs=(q_spec, k_spec, v_spec, PartitionSpec(q_spec[0], None)), out_specs=q_spec,
        check_vma=False,  # the Pallas call has no replication rule
    )  # fmt: skip
    return attend(q_btnh, k_bskh, v_bskv, segment_ids_bt)


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def _splash_local(q_btnh, k_bskh, v_bskv, segment_ids_bt, scale, window, softcap, block_size, interpret):
    """Splash on one device's arrays; rows are padded to a whole number of blocks."""
    length, num_heads = q_btnh.shape[1], q_btnh.shape[2]
    block = min(block_size, _round_up(length, SPLASH_LANES))
    padded = _round_up(length, block)

    def heads_first(x):  # [batch, length, heads, dim] -> [batch, heads, padded, dim]
        return jnp.pad(x, [(0, 0), (0, padded - length), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    # splash has no scale argument: it goes on the queries, as the kernel's own reference does.
    # Padding tokens form a segment of their own (-1) after every real token: no real query sees
    # them, and each attends at least to itself, so no row of the softmax is empty.
    q, k, v = heads_first(q_btnh * jnp.asarray(scale, q_btnh.dtype)), heads_first(k_bskh), heads_first(v_bskv)
    segment_ids = jnp.pad(segment_ids_bt, [(0, 0), (0, padded - length)], constant_values=-1)
    shape = (padded, padded)
    mask = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window - 1, 0), 0)
    sizes = dict(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block)
    sizes.update(block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([mask] * num_heads), block_sizes=splash.BlockSizes(**sizes),
        attn_logits_soft_cap=softcap, interpret=interpret,
    )  # fmt: skip
    out_bntv = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q, k, v, segment_ids)
    return out_bntv[:, :, :length].transpose(0, 2, 1, 3).astype(q_btnh.dtype)
