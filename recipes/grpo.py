"""The reinforcement demo: GRPO teaches a small model sums it gets only sometimes right.

    make grpo         # or: nnxlm train --recipe recipes/grpo.py:sums
                      #     nnxlm train --recipe recipes/grpo.py
First `sums` pretrains a small model from scratch on "a + b = c" lines (nnxlm.data.sums) for a
short while: it learns the form and gets about a fifth of the training sums right when sampled.
Then `grpo` samples 8 answers to each prompt "a + b =", rewards the exactly right ones
(nnxlm.rewards.exact_match) and raises the probability of the answers that beat their group's
mean. A model this small learns the table of its training sums, not addition: the held-out sums
do not improve, so evaluation samples the training prompts (with a fixed seed).
"""

import fiddle as fdl

from nnxlm import rewards
from nnxlm.data.sums import Sums
from nnxlm.objectives.grpo import GRPO
from nnxlm.recipes import models, trainer

MAX_OPERAND = 20


def _model():
    # 4 layers x (128 x (4 + 2 + 2) x 32 attention + 4 x 32 x 128 output + 3 x 128 x 512 MLP)
    # = 4 x 0.26 M = 1.0 M parameters, and 2 x 512 x 128 = 0.13 M of embedding and head: 512 is the
    # smallest vocabulary nnxlm trains (261 ids are bytes and specials)
    model = models.llama(vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=512)
    model.scan_layers = False
    return model


def sums():
    # 100 steps of 16 rows x 64 tokens, about 6 sums a row: ~9,600 sums, 27 passes over the 360
    # training pairs; longer and the model knows them all (and GRPO has nothing to learn)
    cfg = trainer(_model(), name="sums", seq_len=64, batch_size=16, num_steps=100)
    cfg.train_data = fdl.Config(Sums, max_operand=MAX_OPERAND, split="train", text=True)
    cfg.eval_data = fdl.Config(Sums, max_operand=MAX_OPERAND, split="eval", text=True)
    cfg.optimizer.learning_rate = 3e-3
    cfg.optimizer.warmup_steps = 10
    cfg.eval_every = 50
    cfg.eval_batches = 4
    cfg.checkpoint_every = 100
    cfg.log_every = 25
    return cfg


def grpo():
    # 128 rows = 16 prompts x a group of 8 sampled answers of at most 4 tokens; 200 steps visit
    # each of the 360 training prompts about 9 times
    cfg = trainer(_model(), name="grpo", seq_len=16, batch_size=128, num_steps=200)
    cfg.load_parameters_path = "runs/sums"
    cfg.train_data = fdl.Config(Sums, max_operand=MAX_OPERAND, split="train")
    cfg.eval_data = fdl.Config(Sums, max_operand=MAX_OPERAND, split="train")  # see the docstring
    cfg.objective = fdl.Config(GRPO, rewards=[rewards.exact_match], group_size=8, max_new_tokens=4)
    # Adam moves every weight about lr a step whatever the gradient: at 1e-3 the noisy gradient of
    # 16 prompts drove the policy away (KL 3.6 a token at step 35) and the reward down
    cfg.optimizer.learning_rate = 5e-4
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.weight_decay = 0.0
    cfg.eval_every = 20
    cfg.eval_batches = 4
    cfg.eval_at_start = True
    cfg.checkpoint_every = 50
    cfg.log_every = 10
    return cfg
