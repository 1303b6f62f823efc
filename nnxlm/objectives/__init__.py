"""Objectives: what a training step optimises and the batches it takes (see base.py).

NextToken (pretraining, the default) and SFT (supervised fine-tuning on chat or prompt/completion
data); a recipe chooses one with its `objective` field.
"""

from nnxlm.objectives.base import TOKEN_FIELDS, Terms
from nnxlm.objectives.next_token import NextToken
from nnxlm.objectives.sft import SFT

__all__ = ["SFT", "TOKEN_FIELDS", "NextToken", "Terms"]
