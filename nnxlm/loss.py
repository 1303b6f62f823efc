"""Next-token cross-entropy over packed rows, with optional z-loss."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_btv, targets_bt, loss_mask_bt, z_loss_weight: float = 0.0):
    """Sums over unmasked tokens of -log p(target) (plus z_loss_weight * log Z ** 2).

    Returns (total loss to differentiate, cross-entropy alone, number of tokens counted), the first
    two summed over the counted tokens: a batch's mean is sum / count, and sums of micro-batches add.
    """
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    mask = loss_mask_bt.astype(jnp.float32)
    nll = jnp.sum((log_z_bt - target_logit_bt) * mask)
    z_loss = jnp.sum(jnp.square(log_z_bt) * mask)
    return nll + z_loss_weight * z_loss, nll, jnp.sum(mask)


def token_logps(model, batch) -> jax.Array:
    """[rows, seq_len] log p(target) of every position of a batch (masked or not), in float32:
    what preference and policy objectives score responses with."""
    logits_btv = model(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    target_logit_bt = jnp.take_along_axis(logits_btv, batch["targets"][..., None], axis=-1)[..., 0]
    return target_logit_bt - jax.nn.logsumexp(logits_btv, axis=-1)


def multi_token_prediction_loss(mtp_logits_dbtv, targets_bt, loss_mask_bt, segment_ids_bt):
    """Mean over depths k = 1..D of the cross-entropy of depth k's predictions (Transformer.mtp_logits:
    at position i, of the token at i + k + 1, which is targets[:, i + k]).

    A prediction counts where that target counts (loss_mask[:, i + k]) and lies in position i's
    document (same segment id) and row. DeepSeek-V3's L_MTP is this mean times lambda."""
    depth, _, length, _ = mtp_logits_dbtv.shape
    losses = []
    for k in range(1, depth + 1):
        ahead = lambda x, k=k: jnp.roll(x, -k, axis=1)  # noqa: E731
        within_row = jnp.arange(length) < length - k
        mask_bt = ahead(loss_mask_bt).astype(bool) & (ahead(segment_ids_bt) == segment_ids_bt) & within_row
        _, nll, count = cross_entropy(mtp_logits_dbtv[k - 1], ahead(targets_bt), mask_bt)
        losses.append(nll / jnp.maximum(count, 1.0))
    return sum(losses) / depth
