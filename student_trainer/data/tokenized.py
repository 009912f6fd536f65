"""Tokenize a split once up front, and pad batches to their own longest item."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from student_trainer.data.tasks import (
    TaskData,
)


class TokenizedDataset(Dataset):
    """A split tokenized once up front (fast tokenizer, batched, truncated, unpadded)."""

    def __init__(self, data: TaskData, tokenizer, max_seq_length: int, *, chunk_size: int = 2048):
        self.data = data
        self.input_ids: list[list[int]] = []
        self.token_type_ids: list[list[int]] = []
        examples = data.examples
        for start in range(0, len(examples), chunk_size):
            chunk = examples[start : start + chunk_size]
            text_b = [e.text_b for e in chunk] if data.is_pair else None
            encoded = tokenizer(
                [e.text_a for e in chunk],
                text_b,
                truncation=True,
                max_length=max_seq_length,
                return_token_type_ids=True,
                return_attention_mask=False,
            )
            self.input_ids.extend(encoded["input_ids"])
            self.token_type_ids.extend(encoded["token_type_ids"])
        self.labels = [e.label for e in examples]

    def __len__(self) -> int:
        return len(self.input_ids)

    def texts(self, indices: list[int]) -> tuple[list[str], list[str] | None]:
        """The raw ``(text, text_pair)`` of these rows: what a teacher with its own vocabulary reads."""
        examples = [self.data.examples[i] for i in indices]
        pairs = [e.text_b or "" for e in examples] if self.data.is_pair else None
        return [e.text_a for e in examples], pairs

    def __getitem__(self, index: int) -> dict:
        return {
            "input_ids": self.input_ids[index],
            "token_type_ids": self.token_type_ids[index],
            "label": self.labels[index],
            "index": index,  # a teacher with its own vocabulary reads the row's text
        }


def collate_batch(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest item in the batch: input_ids, attention_mask, token_type_ids, labels (and
    the rows' dataset ``index`` when the items carry one). Items without ``token_type_ids`` (a
    tokenizer that makes none) get zeros; ``labels`` may be spelled ``label``, as in `datasets`."""
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    token_type_ids = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if "token_type_ids" in item:
            token_type_ids[row, :n] = torch.as_tensor(item["token_type_ids"], dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": torch.tensor([item.get("label", item.get("labels")) for item in items], dtype=torch.long),
    }
    if "index" in items[0]:
        batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    return batch
