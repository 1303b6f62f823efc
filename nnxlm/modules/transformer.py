"""The decoder-only Transformer: embed -> num_layers decoder blocks -> final norm -> logits.

Layers are either stacked (one set of parameters with a leading `layers` axis, applied with
nnx.scan: compiles in time independent of depth) or a plain list applied in a Python loop
(`scan_layers=False`). Both hold the same numbers; checkpoints store the stacked layout so either
model loads them. A model whose first layers differ from the rest (DeepSeek-V3: dense MLPs before
the mixture-of-experts layers) holds two such stacks, `first_layers` and `layers`, applied in turn.
Under a mesh with a `pipeline` axis the stacked `layers` run in pipeline stages over
micro-batches (nnxlm.modules.pipeline).

For decoding, the model also takes a KVCache (init_cache) and returns the updated one with the
logits; features() and logits() split the forward pass so that a prefill computes the head only
where it needs it.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.errors import UserError
from nnxlm.modules.dense import Dense
from nnxlm.modules.embed import Embedder
from nnxlm.modules.kv_cache import KVCache, write_slots
from nnxlm.modules.lora import LoRA
from nnxlm.modules.mtp import MultiTokenPrediction, shifted_ids
from nnxlm.modules.norms import RMSNorm
from nnxlm.modules.pipeline import pipeline_stages, run_pipeline
from nnxlm.modules.quantization import Quantization
from nnxlm.modules.rope import inverse_frequencies
from nnxlm.modules.stack import stacked, unstacked
from nnxlm.sharding.rules import constrain

# The window of a global layer in a layer_pattern: larger than any position distance.
GLOBAL_WINDOW = jnp.iinfo(jnp.int32).max
PATTERN_FIELDS = ("sliding_window", "rope_theta", "rope_scaling")
KV_FIELDS = ("k", "v", "k_scale", "v_scale")  # a KVCache's per-layer arrays

# What the backward pass may keep instead of recomputing: "none" keeps everything (no remat),
# "full" keeps only each block's input, "dots" keeps matmul outputs without a batch dimension.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """ids [batch, length] int32 -> logits [batch, length, vocab_size] float32.

    Args:
      block: factory called as block(d_model, norm=, dtype=, param_dtype=, rngs=).
      norm: factory for every norm (passed down to the blocks and used for the final norm).
      tie_embeddings: reuse the embedding table as the output head.
      scan_layers: stack layers and apply them with nnx.scan instead of a Python loop.
      remat_policy: one of REMAT_POLICIES, applied to each block.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      embed_scale: multiply the embeddings by sqrt(d_model) (in the compute dtype), as Gemma.
      final_logit_softcap: logits become cap * tanh(logits / cap) (Gemma 2).
      layer_pattern: per-layer attention settings cycled over the layers (layer i takes entry
        i % len): dicts of sliding_window (None: global), rope_theta and rope_scaling, each
        replacing the attention recipe's own value (Gemma 2: ({"sliding_window": 4096},
        {"sliding_window": None})). The layers keep one parameter shape; each layer's window and
        RoPE frequencies are passed into its block call as traced values (scanned with the layers).
      first_block, num_first_layers: the first num_first_layers of the num_layers layers are built
        by first_block instead of block (DeepSeek-V3: 3 dense-MLP layers, then mixture-of-experts
        ones), as a stack of their own, `first_layers`; `layers` holds the others.
      mtp_depth: multi-token prediction modules for training (DeepSeek-V3: 1), each one more
        `block` (see nnxlm.modules.mtp and mtp_logits); 0: none.
      lora: LoRA adapters added to the projections once the model is built (nnxlm.modules.lora);
        None: none.
      quantization: int8 weights and / or KV cache (nnxlm.modules.quantization), applied once the
        model is built (after the adapters, which stay in float: QLoRA); None: float.
      context_length: the longest sequence the model was made for (a converted model's HF
        max_position_embeddings); serving defaults to it, capped, and refuses more. Nothing in the
        computation depends on it. None: not known (serving uses the run's seq_len).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        block: Callable[..., nnx.Module],
        norm: Callable[..., nnx.Module] = RMSNorm,
        tie_embeddings: bool = False,
        scan_layers: bool = True,
        remat_policy: str = "none",
        embed_scale: bool = False,
        final_logit_softcap: float | None = None,
        layer_pattern: tuple[dict, ...] | None = None,
        first_block: Callable[..., nnx.Module] | None = None,
        num_first_layers: int = 0,
        mtp_depth: int = 0,
        lora: LoRA | None = None,
        quantization: Quantization | None = None,
        context_length: int | None = None,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}: use one of {sorted(REMAT_POLICIES)}")
        if not 0 <= num_first_layers < num_layers or (first_block is None) != (num_first_layers == 0):
            raise ValueError(
                f"num_first_layers={num_first_layers} with first_block={first_block!r}: give a first_block "
                f"and 1 to num_layers - 1 ({num_layers - 1}) first layers, or neither"
            )
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_layers
        self.tie_embeddings, self.scan_layers, self.remat_policy = tie_embeddings, scan_layers, remat_policy
        self.dtype, self.context_length = jnp.dtype(dtype), context_length
        self.embed_scale, self.final_logit_softcap = embed_scale, final_logit_softcap
        if layer_pattern is not None:
            unknown = sorted({field for entry in layer_pattern for field in entry} - set(PATTERN_FIELDS))
            if not layer_pattern or unknown:
                raise ValueError(f"layer_pattern entries take only {PATTERN_FIELDS}; got {unknown or 'no entries'}")
        # a tuple of sorted item tuples: module attributes must be hashable (see layer_pattern)
        self._layer_pattern = None if layer_pattern is None else tuple(_freeze(entry) for entry in layer_pattern)
        # Unit-variance embeddings give the residual stream a token signal as strong as a block's
        # output; a tied table doubles as the head, where std 1/sqrt(d) keeps logits at unit scale.
        init_std = d_model**-0.5 if tie_embeddings else 1.0
        self.embedder = Embedder(vocab_size, d_model, init_std=init_std, param_dtype=param_dtype, rngs=rngs)
        shared = dict(norm=norm, dtype=dtype, param_dtype=param_dtype)
        self.num_first_layers = num_first_layers
        make_first = functools.partial(first_block, d_model, **shared) if num_first_layers else None
        self.first_layers = self._stack(make_first, num_first_layers, rngs) if num_first_layers else None
        self.layers = self._stack(functools.partial(block, d_model, **shared), num_layers - num_first_layers, rngs)
        self.final_norm = norm(d_model, param_dtype=param_dtype, rngs=rngs)
        if not tie_embeddings:
            self.head = Dense(d_model, vocab_size, logical_axes=("embed", "vocab"), param_dtype=param_dtype, rngs=rngs)
        self.mtp_depth = mtp_depth
        self.mtp = (
            MultiTokenPrediction(d_model, depth=mtp_depth, block=block, **shared, rngs=rngs) if mtp_depth else None
        )
        self.lora = lora
        if lora is not None:
            lora.apply(self, rngs)
        self.quantization = None
        if quantization is not None:
            quantization.apply(self)

    def _stack(self, make_block, count: int, rngs: nnx.Rngs) -> nnx.Module:
        if self.scan_layers:
            return stacked(make_block, count, rngs)
        return nnx.List([make_block(rngs=rngs) for _ in range(count)])

    def _stacks(self) -> list[tuple[nnx.Module, slice]]:
        """Each layer stack with the slice of layer indices it holds: first_layers (if any), layers."""
        first = self.num_first_layers
        stacks = [(self.first_layers, slice(0, first))] if first else []
        return [*stacks, (self.layers, slice(first, self.num_layers))]

    def _attention(self) -> nnx.Module:
        """The attention module of the main stack (its hyperparameters are every layer's)."""
        return self.layers.attention if self.scan_layers else self.layers[0].attention

    def __call__(
        self,
        ids_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """positions default to 0..length-1 (after cache.index with a cache) and segment ids to one
        document a row. With a cache (see init_cache) returns (logits, cache with ids written).
        With multi-token prediction, under nnx.capture only (training), also sows mtp_logits."""
        if cache is not None:
            x_btd, cache = self.features(ids_bt, positions_bt, segment_ids_bt, dropout_key=dropout_key, cache=cache)
            return self.logits(x_btd), cache
        positions_bt, segment_ids_bt = self._rows(ids_bt, positions_bt, segment_ids_bt)
        x_btd = self.features(ids_bt, positions_bt, segment_ids_bt, dropout_key=dropout_key)
        if self.mtp is not None and hasattr(self, "__captures__"):  # inference skips it (see MoE)
            self.sow(nnx.Intermediate, "mtp_logits", self.mtp_logits(x_btd, ids_bt, positions_bt, segment_ids_bt))
        return self.logits(x_btd)

    def mtp_logits(self, x_btd, ids_bt, positions_bt, segment_ids_bt) -> jax.Array:
        """float32 logits [mtp_depth, batch, length, vocab] of the multi-token prediction modules
        (nnxlm.modules.mtp) from the features x of ids: depth k's logits at position i predict the
        token at i + k + 1, i.e. targets[:, i + k] (see nnxlm.loss.multi_token_prediction_loss)."""
        embedded_dbtd = self._embed(shifted_ids(ids_bt, self.mtp_depth))
        policy = REMAT_POLICIES[self.remat_policy]
        return self.logits(self.mtp(x_btd, embedded_dbtd, positions_bt, segment_ids_bt, remat_policy=policy))

    def _embed(self, ids):
        x = self.embedder.embed(ids, self.dtype)
        return x * jnp.asarray(self.d_model**0.5, self.dtype) if self.embed_scale else x

    def _rows(self, ids_bt, positions_bt, segment_ids_bt, cache=None):
        """positions (default 0..length-1, after cache.index with a cache) and segment ids (default
        one document a row)."""
        if positions_bt is None:
            first = 0 if cache is None else jnp.reshape(cache.index, (-1, 1))  # [] or [batch] (per row)
            positions_bt = jnp.broadcast_to(first + jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(ids_bt, dtype=jnp.int32)
        return positions_bt, segment_ids_bt

    @property
    def layer_pattern(self) -> tuple[dict, ...] | None:
        return None if self._layer_pattern is None else tuple(_thaw(entry) for entry in self._layer_pattern)

    def layer_settings(self) -> list[dict]:
        """Each layer's effective sliding_window, rope_theta and rope_scaling (the pattern's entry
        over the attention's own)."""
        own = {field: getattr(self._attention(), field, None) for field in PATTERN_FIELDS}  # MLA: no window
        pattern = self.layer_pattern or ({},)
        return [{**own, **pattern[i % len(pattern)]} for i in range(self.num_layers)]

    def _layer_values(self) -> dict | None:
        """{"window": int32 [layers], "inv_freq": float32 [layers, head_dim // 2]} of a layer_pattern."""
        if self._layer_pattern is None:
            return None
        attention = self._attention()
        settings = self.layer_settings()
        windows = [GLOBAL_WINDOW if s["sliding_window"] is None else s["sliding_window"] for s in settings]
        inv_freq = [inverse_frequencies(attention.head_dim, s["rope_theta"], s["rope_scaling"]) for s in settings]
        return {"window": jnp.array(windows, jnp.int32), "inv_freq": jnp.stack(inv_freq)}

    def features(self, ids_bt, positions_bt=None, segment_ids_bt=None, *, dropout_key=None, cache=None):
        """The final-normed hidden states [batch, length, embed] (and the new cache, given one)."""
        positions_bt, segment_ids_bt = self._rows(ids_bt, positions_bt, segment_ids_bt, cache)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
        x_btd = constrain(self._embed(ids_bt), ("batch", "length", None))
        if cache is None:
            x_btd = self._apply_layers(x_btd, positions_bt, segment_ids_bt, keys)
            return self.final_norm(x_btd)
        key_segments_bs = write_slots(cache.segment_ids, segment_ids_bt, cache.index, axis=1)
        cache = dataclasses.replace(cache, segment_ids=key_segments_bs)
        x_btd, cache = self._apply_layers_cached(x_btd, positions_bt, segment_ids_bt, keys, cache)
        return self.final_norm(x_btd), dataclasses.replace(cache, index=cache.index + ids_bt.shape[1])

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] of final-normed hidden states [..., embed]."""
        if self.tie_embeddings:
            logits_btv = self.embedder.attend(x_btd)
        else:
            logits_btv = self.head(x_btd)
        logits_btv = logits_btv.astype(jnp.float32)
        if self.final_logit_softcap is not None:
            logits_btv = self.final_logit_softcap * jnp.tanh(logits_btv / self.final_logit_softcap)
        return logits_btv

    def init_cache(self, batch: int, max_length: int, stacked: bool | None = None) -> KVCache:
        """An empty KVCache with max_length slots a row (see nnxlm.modules.kv_cache): k and v with a
        leading layers axis when stacked (default: scan_layers), else a tuple of one a layer; int8
        with scales when the model's quantization says kv="int8"."""
        stacked = self.scan_layers if stacked is None else stacked
        k, v = self._attention().init_cache(batch, max_length)
        int8 = self.quantization is not None and self.quantization.kv == "int8"
        if int8:
            k, v = k.astype(jnp.int8), v.astype(jnp.int8)
        scale = jnp.zeros(k.shape[:-1], jnp.float32) if int8 else None

        def layers(x):
            if x is None:
                return None
            return jnp.zeros((self.num_layers, *x.shape), x.dtype) if stacked else (x,) * self.num_layers

        segment_ids = jnp.zeros((batch, max_length), jnp.int32)
        return KVCache(
            k=layers(k),
            v=layers(v),
            segment_ids=segment_ids,
            index=jnp.zeros((), jnp.int32),
            k_scale=layers(scale),
            v_scale=layers(scale),
        )

    def unstack_layers(self) -> None:
        """Turns stacked layers into a list of blocks in place (the same numbers; scan_layers becomes
        False). Done inside a jitted decode loop but outside its body, the per-layer parameter slices
        are taken once instead of at every step (scan copies each layer's parameters every step)."""
        if not self.scan_layers:
            return
        if self.first_layers is not None:
            self.first_layers = nnx.List(unstacked(self.first_layers, self.num_first_layers))
        self.layers = nnx.List(unstacked(self.layers, self.num_layers - self.num_first_layers))
        self.scan_layers = False

    def _apply_layers(self, x_btd, positions_bt, segment_ids_bt, keys):
        values = self._layer_values()
        for layers, part in self._stacks():
            stack_keys, stack_values = _part(keys, part), _part(values, part)
            if layers is self.layers and pipeline_stages() > 1:  # a mesh with a pipeline axis
                x_btd = self._apply_pipelined(x_btd, positions_bt, segment_ids_bt, stack_keys, stack_values)
                continue
            x_btd = self._apply_stack(layers, x_btd, positions_bt, segment_ids_bt, stack_keys, stack_values)
        return x_btd

    def _apply_pipelined(self, x_btd, positions_bt, segment_ids_bt, keys, values):
        """The main stack in pipeline stages (nnxlm.modules.pipeline); the MoE balance losses of
        its layers are sown here, formed from statistics of all micro-batches."""
        if not self.scan_layers:
            raise UserError("a mesh with a pipeline axis needs stacked layers: set model.scan_layers=True")
        capture = hasattr(self, "__captures__")
        policy = REMAT_POLICIES[self.remat_policy]
        x_btd, losses = run_pipeline(
            self.layers, x_btd, positions_bt, segment_ids_bt, keys, values, policy=policy, capture=capture
        )
        if losses is not None:
            self.sow(nnx.Intermediate, "moe_aux_loss", losses)
        return x_btd

    def _apply_stack(self, layers, x_btd, positions_bt, segment_ids_bt, keys, values):
        def apply_block(block, x, positions, segment_ids, key, layer):
            if layer is None:
                return block(x, positions, segment_ids, key)
            return block(x, positions, segment_ids, key, layer=layer)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            apply_block = nnx.remat(apply_block, policy=policy)
        if self.scan_layers:
            key_axis = None if keys is None else 0
            value_axis = None if values is None else 0
            in_axes = (0, nnx.Carry, None, None, key_axis, value_axis)
            scan = nnx.scan(apply_block, in_axes=in_axes, out_axes=nnx.Carry)
            return scan(layers, x_btd, positions_bt, segment_ids_bt, keys, values)
        for i, block in enumerate(layers):
            key = None if keys is None else keys[i]
            x_btd = apply_block(block, x_btd, positions_bt, segment_ids_bt, key, _layer(values, i))
        return x_btd

    def _apply_layers_cached(self, x_btd, positions_bt, segment_ids_bt, keys, cache):
        """The layers with a cache (inference: no remat); each layer reads and writes its k, v.

        A stacked cache (arrays with a layers axis) goes through nnx.scan with stacked layers; a
        tuple cache runs the layers unrolled, slicing stacked parameters layer by layer. Unrolled is
        what generation uses (after unstack_layers): on CPU its decode step ran 1.5x faster than
        the scan's at batch 1 and 8.
        """

        values = self._layer_values()

        def apply_block(block, x, positions, segment_ids, key, kv, key_segments, index, layer=None):
            k, v, k_scale, v_scale = kv
            layer_cache = KVCache(k, v, key_segments, index, k_scale, v_scale)
            if layer is None:
                x, layer_cache = block(x, positions, segment_ids, key, cache=layer_cache)
            else:
                x, layer_cache = block(x, positions, segment_ids, key, cache=layer_cache, layer=layer)
            return x, (layer_cache.k, layer_cache.v, layer_cache.k_scale, layer_cache.v_scale)

        shared = (cache.segment_ids, cache.index)
        per_layer = (cache.k, cache.v, cache.k_scale, cache.v_scale)
        if self.scan_layers and not isinstance(cache.k, tuple):
            key_axis = None if keys is None else 0
            value_axis = None if values is None else 0
            in_axes = (0, nnx.Carry, None, None, key_axis, 0, None, None, value_axis)
            scan = nnx.scan(apply_block, in_axes=in_axes, out_axes=(nnx.Carry, 0))
            parts = []
            for layers, part in self._stacks():
                x_btd, kv = scan(
                    layers, x_btd, positions_bt, segment_ids_bt, _part(keys, part),
                    jax.tree.map(lambda x, part=part: x[part], per_layer), *shared, _part(values, part),
                )  # fmt: skip
                parts.append(kv)
            kv = parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
            return x_btd, dataclasses.replace(cache, **dict(zip(KV_FIELDS, kv, strict=True)))
        blocks = []
        for layers, part in self._stacks():  # stacked parameters sliced layer by layer (see unstack_layers)
            blocks += unstacked(layers, part.stop - part.start) if self.scan_layers else list(layers)
        written = []
        for i, block in enumerate(blocks):
            key = None if keys is None else keys[i]
            layer_kv = tuple(None if x is None else x[i] for x in per_layer)
            x_btd, kv = apply_block(
                block, x_btd, positions_bt, segment_ids_bt, key, layer_kv, *shared, _layer(values, i)
            )
            written.append(kv)
        gather = tuple if isinstance(cache.k, tuple) else jnp.stack
        kv = [None if per_layer[f] is None else gather([w[f] for w in written]) for f in range(len(KV_FIELDS))]
        return x_btd, dataclasses.replace(cache, **dict(zip(KV_FIELDS, kv, strict=True)))


def _layer(values: dict | None, i: int) -> dict | None:
    return None if values is None else {name: value[i] for name, value in values.items()}


def _part(values, part: slice):
    """The layers `part` of per-layer values: an array with a layers axis, a dict of them, or None."""
    if values is None:
        return None
    return {name: value[part] for name, value in values.items()} if isinstance(values, dict) else values[part]


def _freeze(entry: dict) -> tuple:
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in entry.items()))


def _thaw(entry: tuple) -> dict:
    return {k: dict(v) if k == "rope_scaling" and v is not None else v for k, v in entry}
