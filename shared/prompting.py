"""A prompted (zero-shot) teacher's configuration: a template and the label words of each class.

One shape wherever a causal LM is asked to classify, in the service's config or on the trainer's
command line (``--teacher_prompt NAME=FILE``)::

    prompt: "Review: {text}\\nSentiment:"        # {text}; {text_pair} for pair tasks
    label_words:                                  # class -> the words that mean it, in class order
      negative: [" negative"]
      positive: [" positive", " great"]
    chat: false                                   # true: the prompt is a user message (instruct models)

A class's score is the log-sum-exp of its words' log-probabilities as the next token.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.config_file import read_yaml_mapping
from shared.errors import UserError

FIELDS = ("text", "text_pair")


@dataclass(frozen=True)
class LabelPrompt:
    """A parsed prompt configuration (see the module docstring)."""

    prompt: str
    label_words: tuple[tuple[str, tuple[str, ...]], ...]  # (class, words), in class order
    chat: bool = False

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str) -> LabelPrompt:
        """Check every field; a ``UserError`` names ``where`` and the field that is wrong."""
        unknown = sorted(set(raw) - {"prompt", "label_words", "chat"})
        if unknown:
            raise UserError(f"{where}: unknown field(s) {unknown} (prompt, label_words, chat)")
        prompt, words, chat = raw.get("prompt"), raw.get("label_words"), raw.get("chat", False)
        if not isinstance(prompt, str) or "{text}" not in prompt:
            raise UserError(f"{where}: prompt must be a string holding '{{text}}', got {prompt!r}")
        named = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
        if named - set(FIELDS):
            raise UserError(f"{where}: prompt may name only {{text}} and {{text_pair}}, got {sorted(named)}")
        if not isinstance(words, Mapping) or len(words) < 2:
            raise UserError(f"{where}: label_words must map at least two classes to their words")
        parsed = []
        for label, entry in words.items():
            entry = [entry] if isinstance(entry, str) else entry
            if not isinstance(entry, list) or not entry or not all(isinstance(w, str) and w for w in entry):
                raise UserError(f"{where}: label_words.{label} must be a non-empty list of non-empty strings")
            parsed.append((str(label), tuple(entry)))
        every = [word for _, entry in parsed for word in entry]
        if len(set(every)) != len(every):
            raise UserError(f"{where}: label_words: a word may mean one class only")
        if not isinstance(chat, bool):
            raise UserError(f"{where}: chat must be true or false, got {chat!r}")
        return cls(prompt, tuple(parsed), chat)

    @classmethod
    def read(cls, path: str) -> LabelPrompt:
        return cls.from_mapping(read_yaml_mapping(path, "with prompt and label_words"), path)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.label_words)

    def render(self, text: str, text_pair: str | None = None) -> str:
        """The prompt of one row (``{text_pair}`` is empty for single-text tasks)."""
        return self.prompt.format(text=text, text_pair=text_pair or "")

    def fingerprint(self) -> str:
        """What identifies this prompt among stored teacher answers."""
        canonical = json.dumps([self.prompt, self.label_words, self.chat])
        return hashlib.sha256(canonical.encode()).hexdigest()
