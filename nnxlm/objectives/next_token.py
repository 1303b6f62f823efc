"""Next-token prediction on packed text: pretraining's objective and the default of every recipe."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.data import make_dataset, unigram_entropy
from nnxlm.loss import cross_entropy, multi_token_prediction_loss
from nnxlm.objectives.base import TOKEN_FIELDS, Terms


@dataclasses.dataclass(frozen=True)
class NextToken:
    """Cross-entropy of every target whose loss_mask is 1, with the model's auxiliary losses.

    Args:
      z_loss_weight: weight of the log-partition-function penalty (0 disables it).
      moe_balance_weight: weight of the mixture-of-experts load-balancing loss, summed over layers
        (models without experts have none).
      mtp_loss_weight: lambda of a multi-token prediction model (Transformer mtp_depth > 0): the
        mean of its depths' cross-entropies times this is added to the loss (DeepSeek-V3: 0.3,
        then 0.1 for its last 4.8 T tokens).
    """

    z_loss_weight: float = 0.0
    moe_balance_weight: float = 0.01
    mtp_loss_weight: float = 0.3

    batch_fields = TOKEN_FIELDS

    def dataset(self, source, tokenizer, **settings):
        """Documents packed end to end into rows (nnxlm.data.make_dataset)."""
        return make_dataset(source, tokenizer, **settings)

    def units(self, batch) -> jax.Array:
        return jnp.sum(batch["loss_mask"])

    def terms(self, model, batch, dropout_key) -> Terms:
        forward = nnx.capture(model, nnx.Intermediate)  # what layers sow: MoE balance losses, MTP logits
        logits, sown = forward(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)
        loss, nll, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"], self.z_loss_weight)
        sown = [(path[-1], x) for path, var in nnx.to_flat_state(sown) for x in jax.tree.leaves(var.get_value())]
        means, penalty = {}, jnp.zeros(())
        balance = [jnp.sum(x) for name, x in sown if name == "moe_aux_loss"]
        if balance:
            means["moe_balance_loss"] = sum(balance)
            penalty += self.moe_balance_weight * means["moe_balance_loss"]
        mtp_logits = [x for name, x in sown if name == "mtp_logits"]
        if mtp_logits:
            args = (batch["targets"], batch["loss_mask"], batch["segment_ids"])
            means["mtp_loss"] = multi_token_prediction_loss(mtp_logits[0], *args)
            penalty += self.mtp_loss_weight * means["mtp_loss"]
        return Terms(loss=loss, penalty=penalty, sums={"loss": nll}, means=means)

    def baseline(self, source, tokenizer) -> str | None:
        """What a model must beat on `source` (printed at the start of a run): the unigram entropy."""
        entropy = unigram_entropy(source, tokenizer, max_documents=1000)
        return f"eval data unigram entropy {entropy:.3f} nats/token (the loss of token frequencies alone)"

    def sample_text(self, prompt: str, completion: str) -> str:
        """How a sample completion prints: the text continued."""
        return prompt + completion

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        """bos (when the tokenizer has one) and the text's tokens: text is continued as it stands."""
        return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)
