"""Prompted (zero-shot) teachers: a causal LM asked a question, its answer read off label words.

A :class:`~shared.prompting.LabelPrompt` turns each text into a prompt (the user's turn of the
tokenizer's chat template when ``chat``); a class's logit is the log-sum-exp of the next-token
logits of its label words (the log of the probability mass the class gets, up to the softmax's
shared normaliser), so a class with several words is not outvoted by one with a single word. A
word's logit is its first token's: words of two classes must not share one. Only the label words'
rows of the LM head are computed, so the head costs ``2·d`` per label word, not ``2·d·vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from shared.errors import UserError
from shared.prompting import LabelPrompt


def rendered(
    prompt: LabelPrompt, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], pairs: Sequence[str] | None
) -> list[str]:
    """Each text (and pair) in the template, as the user's turn of the chat template when ``chat``."""
    filled = [prompt.render(text, pairs[i] if pairs is not None else None) for i, text in enumerate(texts)]
    if not prompt.chat:
        return filled
    return [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
        )
        for p in filled
    ]


def label_token_ids(prompt: LabelPrompt, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Per class, the first token of each of its label words; refused when a word has no token or
    two classes would share one."""
    owner: dict[int, str] = {}
    per_class = []
    for name, words in prompt.label_words:
        ids = []
        for word in words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise UserError(f"label_words.{name}: {word!r} has no token")
            if owner.setdefault(tokens[0], name) != name:
                raise UserError(
                    f"label_words.{name}: {word!r} starts with the same token as a word of "
                    f"{owner[tokens[0]]!r} ({tokens[0]}), so the two classes cannot be told apart"
                )
            ids.append(tokens[0])
        per_class.append(list(dict.fromkeys(ids)))
    return per_class


class LabelWordHead(nn.Module):
    """Class logits from the pooled (last real token's) final state: the LM head's rows of the
    label words only, the family's final soft-capping (Gemma 2/3), then log-sum-exp per class."""

    def __init__(self, lm_head: nn.Linear, per_class: list[list[int]], softcap: float | None):
        super().__init__()
        rows = [token for ids in per_class for token in ids]
        index = torch.tensor(rows, device=lm_head.weight.device)
        self.weight = nn.Parameter(lm_head.weight.detach().index_select(0, index), requires_grad=False)
        bias = lm_head.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach()[index], requires_grad=False)
        self.softcap = softcap
        ends = torch.tensor([len(ids) for ids in per_class]).cumsum(0).tolist()
        self.columns = [range(end - len(ids), end) for ids, end in zip(per_class, ends, strict=True)]

    @property
    def rows(self) -> int:
        """Rows of the LM head computed per pooled token (what the FLOPs model counts)."""
        return int(self.weight.shape[0])

    def forward(self, pooled: Tensor) -> Tensor:
        logits = F.linear(pooled, self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.stack(
            [logits[:, cols.start : cols.stop].logsumexp(dim=1) for cols in self.columns], dim=1
        )
