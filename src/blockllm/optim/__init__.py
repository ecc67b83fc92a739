"""The BlockLLM optimizer."""

from blockllm.optim.blockllm import BlockLLM

__all__ = ["BlockLLM"]
