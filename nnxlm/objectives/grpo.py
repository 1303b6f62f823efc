"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath) with reward functions.

Each step takes P prompts (nnxlm.data.prompts), samples a group of G completions of each with
nnxlm's KV-cache generator on the live weights (`rollout`, between steps: no copy, no sync), scores
them with the recipe's reward functions (nnxlm.rewards) and gives each completion its advantage
within its group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     (scale_rewards; else r_i - mean)

(a group whose rewards are all equal has A = 0: it teaches nothing). The loss of a completion
token t, with the ratio rho = pi(t) / pi_old(t) to the policy that sampled it:

    -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon) A) + beta KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (the k3 estimator: >= 0, 0 at equality)

averaged over all completion tokens of the batch (aggregation "token", as DAPO and TRL's default)
or over each completion's tokens and then over completions ("sequence", the paper's). The step
makes `iterations` updates on one sampled batch (TRL's num_iterations); pi_old is the policy before
the first, so with one iteration rho = 1 and the gradient is the policy gradient sum_t A grad logp_t.

Logged: reward (mean), reward_spread (mean within-group standard deviation), zero_spread (fraction
of groups whose rewards are all equal), kl, clip_fraction (tokens whose gradient the clip removes),
completion_length (tokens, eos included), sample_tokens_per_s; reward_<name> per reward function
when there are several. Evaluation samples the eval prompts with a fixed seed: eval_reward.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nnxlm.data.prompts import make_prompt_dataset, records, response_row
from nnxlm.errors import UserError
from nnxlm.loss import token_logps
from nnxlm.objectives.base import TOKEN_FIELDS, Terms
from nnxlm.objectives.next_token import NextToken
from nnxlm.objectives.sft import chat_template, user_turn_ids
from nnxlm.rewards import as_conversation, check_reward_functions, reward_name, score

AGGREGATIONS = ("token", "sequence")
EVAL_SEED = 2**30  # evaluation samples with this seed, the same at every evaluation


@dataclasses.dataclass(frozen=True)
class GRPO:
    """GRPO on prompt records ({"prompt": text or messages, other fields for the rewards}).

    Args:
      rewards: reward functions (nnxlm.rewards), summed with reward_weights (default all 1).
      group_size: G, completions sampled per prompt (at least 2); batch_size / G prompts a step.
      max_new_tokens: the longest completion; prompts keep their last seq_len - max_new_tokens tokens.
      temperature, top_k, top_p: how completions are sampled.
      beta: weight of the KL penalty to the reference (the starting model); 0 needs no reference.
      epsilon: the clip range of the ratio, [1 - epsilon, 1 + epsilon].
      aggregation: "token" or "sequence" (see the module docstring).
      scale_rewards: divide advantages by their group's standard deviation.
      iterations: updates per sampled batch.
      stall_steps: a run whose groups all have zero reward spread for this many steps in a row stops.
      chat_template: as SFT's, for prompts given as messages.
    """

    rewards: Sequence[Callable] = ()
    reward_weights: Sequence[float] | None = None
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    beta: float = 0.04
    epsilon: float = 0.2
    aggregation: str = "token"
    scale_rewards: bool = True
    iterations: int = 1
    stall_steps: int = 20
    chat_template: str | None = None
    _stalled: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    batch_fields = {**TOKEN_FIELDS, "advantages": jnp.float32}  # the advantage repeated along the row
    eval_name = "eval_reward"

    def __post_init__(self):
        check_reward_functions(self.rewards, self.reward_weights)
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise UserError(
                f"GRPO group_size is {self.group_size!r}: use at least 2 (advantages compare completions of "
                "one prompt; a group of one has none)"
            )
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"GRPO aggregation is {self.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
        for name, value, low in (("max_new_tokens", self.max_new_tokens, 1), ("iterations", self.iterations, 1)):
            if not isinstance(value, int) or value < low:
                raise UserError(f"GRPO {name} is {value!r}: use a positive integer")
        if not self.beta >= 0 or not 0 < self.epsilon < 1:
            raise UserError(f"GRPO beta {self.beta!r} must be >= 0 and epsilon {self.epsilon!r} in (0, 1)")
        if not self.temperature > 0:
            raise UserError(f"GRPO temperature is {self.temperature!r}: sample with a positive one (e.g. 1.0)")

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    # ----------------------------------------------------------------------------------------------
    # Data and sampling, on the host.

    def dataset(self, source, tokenizer, *, seq_len: int, batch_size: int, **settings):
        if jax.process_count() > 1:
            raise UserError("GRPO samples on one process's devices: run it single-process (any number of devices)")
        if batch_size % self.group_size:
            raise UserError(
                f"batch_size {batch_size} (per data shard) must divide by GRPO group_size {self.group_size}: "
                "each prompt's group of completions shares a batch"
            )
        if self.max_new_tokens >= seq_len:
            raise UserError(
                f"GRPO max_new_tokens {self.max_new_tokens} leaves no room for a prompt in seq_len {seq_len}: "
                "raise seq_len or lower max_new_tokens"
            )
        template = chat_template(tokenizer, self.chat_template)
        prompts = batch_size // self.group_size
        max_prompt_len = seq_len - self.max_new_tokens
        return make_prompt_dataset(
            source, tokenizer, template, max_prompt_len=max_prompt_len, batch_size=prompts, seq_len=seq_len, **settings
        )

    def rollout(self, trainer, prompts: dict[str, np.ndarray], step: int, seed: int | None = None):
        """(the batch the step takes, host metrics) of a batch of prompts: G sampled completions
        each, their rewards and advantages. The sampling key depends on the run's seed and the step
        alone, so a resumed run samples what the uninterrupted one did."""
        from nnxlm.generation import generate

        tokenizer, group = trainer.tokenizer, self.group_size
        prompt_ids = [row[:n].tolist() for row, n in zip(prompts["prompt_ids"], prompts["prompt_length"], strict=True)]
        ids = [p for p in prompt_ids for _ in range(group)]
        seed = (trainer.seed * 1_000_003 + step) % 2**31 if seed is None else seed
        jax.block_until_ready(trainer.state)  # the previous step's update: not sampling time
        start = time.perf_counter()
        new = generate(
            trainer.model, ids, self.max_new_tokens, self.temperature, self.top_k, self.top_p, seed,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.eos_id,
        )  # fmt: skip
        sampling_time = time.perf_counter() - start
        completions = [
            row[: row.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in row else row for row in new.tolist()
        ]
        texts = [tokenizer.decode(c[:-1] if c and c[-1] == tokenizer.eos_id else c) for c in completions]
        rewards_nf = self.score(records(prompts), texts, step)
        weights = np.ones(len(self.rewards)) if self.reward_weights is None else np.asarray(self.reward_weights)
        reward_pg = (rewards_nf @ weights).reshape(-1, group)
        advantages = group_advantages(reward_pg, self.scale_rewards).reshape(-1)
        seq_len = prompts["prompt_ids"].shape[1] + self.max_new_tokens
        rows = [response_row(p, c, seq_len) for p, c in zip(ids, completions, strict=True)]
        batch = {name: np.stack([row[name] for row in rows]) for name in TOKEN_FIELDS}
        batch["advantages"] = np.repeat(advantages[:, None], seq_len, axis=1).astype(np.float32)
        batch.update(examples=prompts["examples"], truncated=prompts["truncated"])  # prompts, logged as counts
        spread = reward_pg.std(axis=1, ddof=1)
        lengths = [len(c) for c in completions]
        metrics = {
            "reward": float(reward_pg.mean()),
            "reward_spread": float(spread.mean()),
            "zero_spread": float(np.mean(spread == 0)),
            "completion_length": float(np.mean(lengths)),
            "sample_tokens_per_s": sum(lengths) / sampling_time,
        }
        if len(self.rewards) > 1:
            metrics.update(
                {f"reward_{reward_name(fn)}": float(rewards_nf[:, i].mean()) for i, fn in enumerate(self.rewards)}
            )
        return batch, metrics

    prepare_batch = rollout  # the Trainer's hook: a host batch -> the batch the step takes

    def score(self, prompt_records: list[dict], completions: list[str], step: int) -> np.ndarray:
        """[completions, reward functions] rewards; each record's fields go to the functions."""
        repeated = [record for record in prompt_records for _ in range(self.group_size)]
        fields = {key: [r.get(key) for r in repeated] for key in dict.fromkeys(k for r in repeated for k in r)}
        prompts = fields.pop("prompt")
        completions = [
            as_conversation(c) if isinstance(p, list) else c for p, c in zip(prompts, completions, strict=True)
        ]
        columns = [score(fn, prompts, completions, fields, step) for fn in self.rewards]
        return np.asarray(columns, np.float64).T

    def evaluate(self, trainer, iterator, batches: int) -> float:
        """Mean reward of completions sampled (with EVAL_SEED) for `batches` batches of eval prompts."""
        rewards = [
            self.rollout(trainer, next(iterator), trainer.step, seed=EVAL_SEED + i)[1]["reward"] for i in range(batches)
        ]
        return float(np.mean(rewards))

    def watch(self, step: int, record: dict) -> None:
        """Stops a run whose every group has had equal rewards for stall_steps steps: no signal."""
        stalled = record.get("zero_spread") == 1.0
        self._stalled["steps"] = self._stalled.get("steps", 0) + 1 if stalled else 0
        if self._stalled["steps"] >= self.stall_steps:
            raise UserError(
                f"step {step}: every group's completions have had the same reward for {self.stall_steps} steps in "
                "a row, so every advantage is 0 and nothing trains: give partial credit in the reward, raise "
                "temperature or group_size, or start from a model that sometimes succeeds (e.g. after SFT)"
            )

    # ----------------------------------------------------------------------------------------------
    # The loss, inside the compiled step.

    def reference_fields(self, reference, batch) -> dict[str, jax.Array]:
        return {"reference_logps": jax.lax.stop_gradient(token_logps(reference, batch))}

    def policy_fields(self, model, batch) -> dict[str, jax.Array]:
        """pi_old, the policy that sampled the batch, before the step's first update (iterations > 1)."""
        if self.iterations == 1:
            return {}  # the ratio is taken to the policy itself (see terms)
        return {"old_logps": jax.lax.stop_gradient(token_logps(model, batch))}

    def units(self, batch) -> jax.Array:
        """Completion tokens ("token") or completions ("sequence")."""
        if self.aggregation == "token":
            return jnp.sum(batch["loss_mask"])
        return jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=-1).astype(jnp.float32))

    def terms(self, model, batch, dropout_key) -> Terms:
        del dropout_key  # pi and pi_old see the same (deterministic) forward pass
        logps = token_logps(model, batch)
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
        reference = batch["reference_logps"] if self.beta > 0 else None
        per_token, kl, clipped = policy_loss(logps, old, batch["advantages"], reference, self.beta, self.epsilon)
        mask = batch["loss_mask"]
        if self.aggregation == "sequence":  # each completion's tokens weigh 1 / its length
            mask = mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
        loss = jnp.sum(per_token * mask)
        sums = {"loss": loss, "kl": jnp.sum(kl * mask), "clip_fraction": jnp.sum(clipped * mask)}
        return Terms(loss=loss, penalty=jnp.zeros(()), sums=sums, means={})

    # ----------------------------------------------------------------------------------------------
    # Sample completions printed by the Trainer.

    def baseline(self, source, tokenizer) -> None:
        return None

    def prompt_ids(self, tokenizer, text: str) -> list[int]:
        if self.chat_template is None:
            return NextToken.prompt_ids(self, tokenizer, text)
        return user_turn_ids(tokenizer, text, self.chat_template)

    def sample_text(self, prompt: str, completion: str) -> str:
        return f"{prompt}{completion}"


def group_advantages(reward_pg: np.ndarray, scale: bool = True) -> np.ndarray:
    """[prompts, G] advantages: each reward less its group's mean, divided by the group's standard
    deviation (+1e-4) when `scale`; exactly 0 in a group whose rewards are all equal."""
    centred = reward_pg - reward_pg.mean(axis=1, keepdims=True)
    spread = reward_pg.std(axis=1, ddof=1, keepdims=True)
    advantages = centred / (spread + 1e-4) if scale else centred
    return np.where(spread > 0, advantages, 0.0)


def policy_loss(logps, old_logps, advantages, reference_logps, beta: float, epsilon: float):
    """Per-token (loss, k3 KL to the reference, 1.0 where the clip removes the gradient), [rows, seq]."""
    ratio = jnp.exp(logps - old_logps)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    loss = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio > 1.0 + epsilon) & (advantages > 0)) | ((ratio < 1.0 - epsilon) & (advantages < 0))
    if reference_logps is None:
        kl = jnp.zeros_like(logps)
    else:
        log_ratio = reference_logps - logps
        kl = jnp.exp(log_ratio) - log_ratio - 1.0
        loss = loss + beta * kl
    return loss, kl, clipped.astype(jnp.float32)
