"""Objectives: what a training step optimises and the batches it takes (see base.py).

NextToken (pretraining, the default), SFT (supervised fine-tuning on chat or prompt/completion
data), DPO (preference pairs) and GRPO (sampled completions scored by reward functions); a recipe
chooses one with its `objective` field.
"""

from nnxlm.objectives.base import TOKEN_FIELDS, Terms
from nnxlm.objectives.dpo import DPO
from nnxlm.objectives.grpo import GRPO
from nnxlm.objectives.next_token import NextToken
from nnxlm.objectives.sft import SFT

__all__ = ["DPO", "GRPO", "SFT", "TOKEN_FIELDS", "NextToken", "Terms"]
