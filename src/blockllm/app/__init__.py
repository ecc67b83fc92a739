"""The ``blockllm`` application: the command line, the training loop, data, models, the methods
BlockLLM is compared with, and the benchmark harness.

It imports the library (``blockllm.optim``, ``blockllm.selection``, ``blockllm.integrations``);
the library never imports it. ``import blockllm`` does not load anything under ``blockllm.app``.
"""
