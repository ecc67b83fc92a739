"""Settings for the model tests."""

import os

# Before transformers/huggingface_hub are imported: a hub lookup must fail at once, never retry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
