"""Serving: a continuous-batching engine (nnxlm.serving.engine) and its OpenAI-compatible HTTP API
(nnxlm.serving.api, `nnxlm serve`)."""

from nnxlm.serving.engine import Engine, QueueFull, Request, Result, Settings, ShuttingDown, Update

__all__ = ["Engine", "QueueFull", "Request", "Result", "Settings", "ShuttingDown", "Update"]
