"""A teacher client in front of another one that answers from the on-disk store first.

Only logits-only queries are stored (hidden-state features are large and tied to one run's
layer choice); any other query goes to the teacher as it is. Rows found in the store cost
nothing (no tokens, no FLOPs; their tokens as counted when they were answered come as
``store_tokens``, so the ledger still knows their length); the rest go to the teacher in one query
and are stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import replace

import torch

from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery, query_rows
from student_trainer.teachers.client import TeacherClient
from student_trainer.teachers.store import AnswerStore, StoredAnswer, entry_key


class StoredTeacherClient:
    """A :class:`~student_trainer.teachers.client.TeacherClient` wrapping ``teacher`` with ``store``."""

    def __init__(self, teacher: TeacherClient, store: AnswerStore):
        self.teacher, self.store = teacher, store
        self.fingerprint: str | None = None

    @property
    def info(self) -> TeacherInfo | None:
        return self.teacher.info

    async def start(self, ready_timeout_s: float) -> TeacherInfo:
        info = await self.teacher.start(ready_timeout_s)
        self.fingerprint = teacher_fingerprint(info, getattr(self.teacher, "prompt", None))
        return info

    async def aclose(self) -> None:
        await self.teacher.aclose()

    async def infer(self, query: TeacherQuery | TextQuery) -> TeacherAnswer:
        if self.fingerprint is None or query.cls_layers or query.token_layers or not query.want_logits:
            return await self.teacher.infer(query)
        keys = [entry_key(self.fingerprint, row_content(query, i)) for i in range(query_rows(query))]
        found = await asyncio.to_thread(self.store.get_many, keys)
        missing = [i for i, key in enumerate(keys) if key not in found]
        rows: dict[int, torch.Tensor] = {
            i: torch.tensor(found[key].logits) for i, key in enumerate(keys) if key in found
        }
        answer = TeacherAnswer(None, None, None, teacher_flops=0, tokens=0, padded_tokens=0)
        if missing:
            answer = await self.teacher.infer(select_rows(query, missing))
            assert answer.logits is not None
            fresh = dict(zip(missing, answer.logits.to(torch.float32), strict=True))
            rows.update(fresh)
            share = answer.tokens // len(missing)
            stored = {keys[i]: StoredAnswer(tuple(fresh[i].tolist()), share) for i in missing}
            await asyncio.to_thread(self.store.put_many, stored)
        logits = torch.stack([rows[i] for i in range(len(keys))])
        hits, stored = len(keys) - len(missing), sum(found[key].tokens for key in keys if key in found)
        return replace(answer, logits=logits, store_hits=hits, store_lookups=len(keys), store_tokens=stored)


def teacher_fingerprint(info: TeacherInfo, prompt: object | None) -> str:
    """What identifies a teacher's answers: its published metadata and, if prompted, its prompt."""
    fields = dataclasses.asdict(info)
    return json.dumps([fields, getattr(prompt, "fingerprint", lambda: None)()], sort_keys=True, default=str)


def row_content(query: TeacherQuery | TextQuery, row: int) -> object:
    """Row ``row`` as the teacher reads it: its text (and pair), or its unpadded token ids."""
    if isinstance(query, TextQuery):
        return ("text", query.text[row], None if query.text_pair is None else query.text_pair[row])
    keep = query.attention_mask[row].bool()
    types = None if query.token_type_ids is None else query.token_type_ids[row][keep].tolist()
    return ("ids", query.input_ids[row][keep].tolist(), types)


def select_rows(query: TeacherQuery | TextQuery, rows: list[int]) -> TeacherQuery | TextQuery:
    """The same query for ``rows`` only."""
    if isinstance(query, TextQuery):
        pair = None if query.text_pair is None else [query.text_pair[i] for i in rows]
        return replace(query, text=[query.text[i] for i in rows], text_pair=pair)
    index = torch.tensor(rows, dtype=torch.long)
    types = None if query.token_type_ids is None else query.token_type_ids[index]
    return replace(query, input_ids=query.input_ids[index], attention_mask=query.attention_mask[index],
                   token_type_ids=types)  # fmt: skip
