"""Direct preference optimisation (Rafailov et al. 2023) on {"prompt", "chosen", "rejected"} pairs.

For a pair, with log-probabilities of each response summed over its tokens under the policy (pi)
and the frozen reference (ref):

    margin z = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    sigmoid:  -(1 - s) log sigmoid(beta z) - s log sigmoid(-beta z)    (s: label_smoothing)
    ipo:      (z - 1 / (2 beta)) ** 2                                  (Azar et al. 2023)

At the start (policy = reference) z = 0 and the sigmoid loss is ln 2 = 0.693147, its gradient with
respect to z is -beta / 2. Logged per pair: loss, reward_chosen = beta (log pi - log ref) of the
chosen response, reward_rejected, margin (their difference) and accuracy (chosen rewarded more).

The reference is served by the Trainer (`uses_reference`): the model with its LoRA adapters
switched off when only adapters train (no copy), else a frozen copy of the starting parameters
kept in the train state and sharded like the policy. Its log-probabilities enter the batch as
`reference_logps` [rows] before the step differentiates the policy. With cache_reference they are
computed once for every row of the data, kept in the run directory (nnxlm.reference_cache) and
looked up for each batch: the step then runs the policy alone.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from nnxlm import reference_cache
from nnxlm.data.preferences import make_preference_dataset
from nnxlm.errors import UserError
from nnxlm.loss import token_logps
from nnxlm.objectives.base import TOKEN_FIELDS, Terms
from nnxlm.objectives.sft import SFT, chat_template, user_turn_ids

LOSSES = ("sigmoid", "ipo")
# A DPO loss within this of ln 2 for STUCK_STEPS steps in a row means the policy is not moving.
STUCK_TOLERANCE, STUCK_STEPS = 1e-6, 50


def dpo_loss(margin, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """The loss of each pair from its log-ratio margin z (see the module docstring)."""
    if loss == "ipo":
        return jnp.square(margin - 1.0 / (2.0 * beta))
    logits = beta * margin
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)


def sequence_logps(model, batch) -> jax.Array:
    """[rows] sum of log p(target) over each row's tokens that carry loss (the response)."""
    return jnp.sum(token_logps(model, batch) * batch["loss_mask"], axis=-1)


@dataclasses.dataclass(frozen=True)
class DPO:
    """DPO on preference pairs (nnxlm.data.preferences), two rows a pair.

    Args:
      beta: strength of the pull towards the reference (0.1, as TRL and the paper).
      loss: "sigmoid" (the paper's) or "ipo".
      label_smoothing: the assumed fraction of pairs whose preference is flipped (sigmoid only;
        conservative DPO, cDPO).
      overlong: a response that does not fit seq_len with its prompt is cut ("truncate") or the
        pair left out ("drop").
      chat_template: as SFT's, for prompts given as messages.
      cache_reference: compute the reference's log-probabilities of all training and eval rows once,
        before the first step, keep them in <workdir>/reference_logps/ and reuse them (TRL's
        precompute_ref_log_probs); single-process runs.
    """

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    overlong: str = "truncate"
    chat_template: str | None = None
    cache_reference: bool = False
    _stuck: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    uses_reference = True
    rows_per_example = 2  # gradient accumulation keeps a pair's rows in one micro-batch

    @property
    def batch_fields(self) -> dict:
        return {**TOKEN_FIELDS, reference_cache.FIELD: jnp.float32} if self.cache_reference else TOKEN_FIELDS

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserError(f"DPO loss is {self.loss!r}: use one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            raise UserError(f"DPO beta is {self.beta!r}: use a positive number (e.g. 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"DPO label_smoothing is {self.label_smoothing!r}: use a number in [0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise UserError("DPO label_smoothing applies to the sigmoid loss only: set loss='sigmoid' or 0")

    def dataset(self, source, tokenizer, **settings):
        template = chat_template(tokenizer, self.chat_template)
        return make_preference_dataset(source, tokenizer, template, overlong=self.overlong, **settings)

    def prepare(self, trainer) -> None:
        """Before the first step: the cached reference log-probabilities (cache_reference)."""
        if self.cache_reference:
            self._cache["cache"] = reference_cache.load_or_build(trainer, [trainer.train_data, trainer.eval_data])

    def prepare_batch(self, trainer, batch: dict, step: int) -> tuple[dict, dict]:
        """A batch with its rows' cached reference log-probabilities (cache_reference)."""
        if self.cache_reference:
            batch = {**batch, reference_cache.FIELD: self._cache["cache"].field(batch)}
        return batch, {}

    def units(self, batch) -> jax.Array:
        """Pairs with a response that carries loss."""
        return jnp.sum(_pairs_kept(batch))

    def reference_fields(self, reference, batch) -> dict[str, jax.Array]:
        """What the step needs from the frozen reference: its log-probabilities of each row (looked
        up when cached, without running the reference)."""
        if reference_cache.FIELD in batch:
            return {"reference_logps": batch[reference_cache.FIELD][:, 0]}
        return {"reference_logps": jax.lax.stop_gradient(sequence_logps(reference, batch))}

    def terms(self, model, batch, dropout_key) -> Terms:
        del dropout_key  # the policy and the reference see the same (deterministic) forward pass
        ratios = sequence_logps(model, batch) - batch["reference_logps"]
        chosen, rejected = ratios[0::2], ratios[1::2]
        kept = _pairs_kept(batch)
        margin = chosen - rejected
        loss = jnp.sum(dpo_loss(margin, self.beta, self.loss, self.label_smoothing) * kept)
        sums = {
            "loss": loss,
            "reward_chosen": jnp.sum(self.beta * chosen * kept),
            "reward_rejected": jnp.sum(self.beta * rejected * kept),
            "margin": jnp.sum(self.beta * margin * kept),
            "accuracy": jnp.sum((margin > 0) * kept),
        }
        return Terms(loss=loss, penalty=jnp.zeros(()), sums=sums, means={})

    def watch(self, step: int, record: dict) -> None:
        """Stops a run whose sigmoid loss has stayed at ln 2 (policy = reference) for STUCK_STEPS."""
        if self.loss != "sigmoid" or self.label_smoothing:
            return
        stuck = abs(record["loss"] - math.log(2)) < STUCK_TOLERANCE
        self._stuck["steps"] = self._stuck.get("steps", 0) + 1 if stuck else 0
        if self._stuck["steps"] >= STUCK_STEPS:
            raise UserError(
                f"step {step}: the DPO loss has been ln 2 = 0.693147 for {STUCK_STEPS} steps: the policy does not "
                "move away from the reference; check that parameters train (trainable, learning rate) and that "
                "chosen and rejected responses differ"
            )

    def baseline(self, source, tokenizer) -> str:
        return "DPO loss at the start (policy = reference): ln 2 = 0.693"

    sample_text = SFT.sample_text  # sample prompts are user turns, as in SFT

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        return user_turn_ids(tokenizer, text, self.chat_template)


def _pairs_kept(batch) -> jax.Array:
    """[pairs] 1.0 where both rows of the pair carry loss."""
    rows = jnp.any(batch["loss_mask"] > 0, axis=-1).astype(jnp.float32)
    return rows[0::2] * rows[1::2]
