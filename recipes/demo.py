"""The demo: a small Llama that learns to write Python from the standard library's own source.

    make train        # or: nnxlm train --recipe recipes/demo.py
Copy this file and edit it to start an experiment of your own.
"""

from nnxlm.recipes import models, trainer


def demo():
    # 8192 tokens x 256 wide = 2.1 M embedding + 2.1 M head parameters;
    # 6 layers x (256 x (4 + 2 + 2) x 64 attention + 4 x 64 x 256 output + 3 x 256 x 1024 MLP)
    # = 6 x 0.98 M = 5.9 M: 10.1 M parameters in all, 50 MFLOP to train on one token.
    model = models.llama(vocab_size=8192, d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, mlp_dim=1024)
    model.scan_layers = False  # on CPU the loop steps ~10 % faster than nnx.scan at this depth
    cfg = trainer(model, name="demo", seq_len=256, batch_size=4, num_steps=1200)
    # 4 rows x 256 tokens = 1024 tokens a step; 1200 steps = 1.2 M tokens (about 1/3 of the corpus).
    # At this budget more, smaller steps learn more per token than fewer, larger ones (measured:
    # 1200 steps of 4 rows ended 0.2 nats lower in eval loss than 600 steps of 8 rows).
    cfg.optimizer.learning_rate = 3e-3
    cfg.optimizer.warmup_steps = 80
    cfg.optimizer.weight_decay = 0.05
    cfg.eval_every = 200
    cfg.eval_batches = 8
    cfg.checkpoint_every = 200
    cfg.log_every = 50
    cfg.sample_prompts = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n\ndef"]
    cfg.sample_max_new_tokens = 64
    cfg.sample_temperature = 0.7  # greedy decoding of a model this small loops on one phrase
    cfg.sample_top_p = 0.95
    return cfg
