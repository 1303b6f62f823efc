"""Next-token cross-entropy over packed rows, with optional z-loss."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_btv, targets_bt, loss_mask_bt, z_loss_weight: float = 0.0):
    """Mean over unmasked tokens of -log p(target), plus z_loss_weight * mean(log Z ** 2).

    Returns (total loss to differentiate, cross-entropy alone, number of tokens counted).
    """
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    mask = loss_mask_bt.astype(jnp.float32)
    count = jnp.sum(mask)
    denominator = jnp.maximum(count, 1.0)
    nll = jnp.sum((log_z_bt - target_logit_bt) * mask) / denominator
    z_loss = jnp.sum(jnp.square(log_z_bt) * mask) / denominator
    return nll + z_loss_weight * z_loss, nll, count
