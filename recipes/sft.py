"""The fine-tuning demo: teach the demo model (`make train`) to write docstrings, with LoRA.

    make sft          # or: nnxlm train --recipe recipes/sft.py (after make train)
The examples come from the standard library's own functions (nnxlm.data.docstrings): the user
gives a function without its docstring, the assistant answers with its first paragraph, in
nnxlm's built-in chat template. The model's weights stay frozen; rank-16 adapters on every
projection train. Evaluation is on functions of the files the demo model never trained on.
"""

import fiddle as fdl

from nnxlm.data.docstrings import PythonDocstrings
from nnxlm.objectives import SFT
from nnxlm.recipes import fiddlers, models, trainer


def sft():
    # the demo model's shape (recipes/demo.py), its weights from runs/demo
    model = models.llama(vocab_size=8192, d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, mlp_dim=1024)
    model.scan_layers = False
    cfg = trainer(model, name="sft", seq_len=256, batch_size=4, num_steps=600)
    cfg.load_parameters_path = "runs/demo"
    cfg.train_data = fdl.Config(PythonDocstrings, split="train")
    cfg.eval_data = fdl.Config(PythonDocstrings, split="eval")
    cfg.objective = fdl.Config(SFT)  # loss on the answers (and their end-of-turn token) only
    # rank 16 on the 7 projections of each layer: 6 x (q 8,192 + k 6,144 + v 6,144 + o 8,192
    # + gate, up, down 3 x 20,480) = 540,672 trainable parameters, 5.1 % of the model
    fiddlers.lora(cfg, rank=16, alpha=32)
    # 600 steps of 4 rows x 256 tokens, about 3 examples a row: ~7,000 examples, 1.5 passes
    cfg.optimizer.learning_rate = 2e-3
    cfg.optimizer.warmup_steps = 30
    cfg.optimizer.weight_decay = 0.0
    cfg.eval_at_start = True  # the masked eval loss before any step, then every 100 steps
    cfg.eval_every = 100
    cfg.eval_batches = 3  # ~29 held-out functions, about 3 a row
    cfg.checkpoint_every = 200
    cfg.log_every = 50
    cfg.sample_prompts = [
        "Write the docstring of this Python function.\n\n```python\ndef add(a, b):\n    return a + b\n```",
        "Write the docstring of this Python function.\n\n```python\ndef is_empty(path):\n"
        "    return os.path.getsize(path) == 0\n```",
    ]
    cfg.sample_max_new_tokens = 48
    return cfg
