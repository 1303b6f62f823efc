"""The preference demo: DPO on the fine-tuning demo's model (`make sft`) to prefer a function's
own docstring over the same words shuffled.

    make dpo          # or: nnxlm train --recipe recipes/dpo.py (after make sft)
Each pair (nnxlm.data.docstrings.PythonDocstringPairs) asks for the docstring of a standard-library
function; the chosen answer is its own first paragraph, the rejected one the same words in a
shuffled order. The starting point is runs/sft: its LoRA adapters are folded into the
frozen base, which is also the reference (adapters off), and fresh rank-16 adapters train.
"""

import fiddle as fdl

from nnxlm.data.docstrings import PythonDocstringPairs
from nnxlm.objectives import DPO
from nnxlm.recipes import fiddlers, models, trainer


def dpo():
    # the demo model's shape (recipes/demo.py), its weights and SFT adapters from runs/sft
    model = models.llama(vocab_size=8192, d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, mlp_dim=1024)
    model.scan_layers = False
    cfg = trainer(model, name="dpo", seq_len=256, batch_size=8, num_steps=200)
    cfg.load_parameters_path = "runs/sft"
    cfg.train_data = fdl.Config(PythonDocstringPairs, split="train")
    cfg.eval_data = fdl.Config(PythonDocstringPairs, split="eval")
    cfg.objective = fdl.Config(DPO, beta=0.1)
    fiddlers.lora(cfg, rank=16, alpha=32)  # the same adapters as runs/sft, which are folded first
    # 200 steps of 4 pairs (8 rows of 256 tokens, one response each): 800 pairs, ~12 % of the split
    cfg.optimizer.learning_rate = 2e-3  # as the SFT demo's
    cfg.optimizer.warmup_steps = 20
    cfg.optimizer.weight_decay = 0.0
    cfg.eval_every = 50
    cfg.eval_batches = 4  # 16 held-out pairs
    cfg.checkpoint_every = 100
    cfg.log_every = 20
    return cfg
