"""Checksums of a checkpoint's arrays, saved beside them and compared when they are read back.

orbax keeps none: bytes changed on disk inside a compressed chunk often decode without error into
other numbers, finite or not, which a run would train on and decode would print. A checksum is
computed from each array's values (not its file bytes), so it holds on any mesh and sharding and
for a checkpoint read one array at a time.

checksum(x) is two 32-bit sums over x's elements, taken as unsigned integers of their width:
    sum_i bits_i * (2 i + 1)           odd weights: any one changed element changes the sum
    sum_i mix(bits_i + i * 0x9E3779B9) a nonlinear mix, so that changes do not cancel by design
Integer sums wrap mod 2**32 in any order, so sharded and unsharded arrays give the same checksum.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
    """x's elements as uint32, each the bits of its value (64-bit ones as two uint32)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """Each element's row-major position (mod 2**32), built in the array's shape: no reshape, so a
    sharded array is never gathered."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _mix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    index = _flat_index(bits.shape)
    weighted = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    mixed = jnp.sum(_mix(bits + index * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)
    return jnp.stack([weighted, mixed])


_checksum_jit = jax.jit(_checksum)


def path_name(path) -> str:
    """A tree path as checksums are keyed: "model/layers/mlp/up"."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def _dtype_name(x) -> str:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return str(x.dtype)
    return str(jax.dtypes.canonicalize_dtype(x.dtype))


def checksums(tree) -> dict[str, str]:
    """{path ("model/head"): "<16 hex digits> <dtype>"} for every array of `tree` (jax or numpy);
    every process calls it for a sharded tree."""
    pairs = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if isinstance(x, (jax.Array, np.ndarray))]
    sums = []
    for _, x in pairs:
        # one at a time: a numpy array's device copy is freed before the next is made, and a sharded
        # array's sum is a collective; on CPU devices, dozens in flight at once deadlock XLA's
        # in-process collectives (the process aborts after 40 s)
        sums.append(_checksum_jit(x).block_until_ready())
    sums = jax.device_get(sums)
    # the dtype as jax holds it (a float64 numpy array is hashed, and read back, as float32 without x64)
    return {
        path_name(p): f"{int(s[0]):08x}{int(s[1]):08x} {_dtype_name(x)}" for (p, x), s in zip(pairs, sums, strict=True)
    }


def mismatch(tree, saved: dict[str, str] | None) -> str | None:
    """The path of the first array of `tree` whose checksum (or dtype) differs from `saved`, those
    written with it, or None. Arrays saved before checksums were kept (saved None, or a path it
    lacks) are not compared."""
    if not saved:
        return None
    for path, value in checksums(tree).items():
        if saved.get(path, value) != value:
            return path
    return None


def saved_dtype(entry: str) -> str:
    return entry.split(" ")[1]


def malformed(saved) -> str | None:
    """What is wrong with a checkpoint's saved checksums (untrusted JSON), or None: a table of
    path -> "<16 hex digits> <dtype>", or absent (written before checksums were kept)."""
    if saved is None:
        return None
    if not isinstance(saved, dict):
        return "holds checksums that are not a table"
    for path, entry in saved.items():
        if not isinstance(entry, str) or not re.fullmatch(r"[0-9a-f]{16} ([a-z0-9_]+|key<\w+>)", entry):
            return f"holds a malformed checksum for {path}"
        if saved_dtype(entry).startswith("key<"):  # a typed PRNG key (hashed as its key data)
            continue
        try:
            np.dtype(jax.dtypes.canonicalize_dtype(saved_dtype(entry)))
        except TypeError:
            return f"holds an unknown dtype for {path}"
    return None
