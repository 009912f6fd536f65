"""Classifier teachers behind vLLM's classification endpoint (``vllm serve --runner pooling``).

``vllm+URL[,URL...]#MODEL`` (``URL``: the server's root, without ``/v1``) sends every row's text
to ``POST /classify`` and takes the class probabilities it returns (``data[i].probs``) as the
teacher's distribution: the class logits are their logarithms (a softmax over them gives the
probabilities back). vLLM does not publish the label names, so the classes are ``LABEL_0`` … in the
model's own order (the index is the contract with the data's labels). Cost: the server's ``usage``
(prompt tokens), the rows sent and, where the checkpoint's folder is readable here, its FLOPs.
Single texts only: a pair task's teacher needs this service.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from shared.flops import FlopsShape
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from student_trainer.kd.ledger import uncounted_flops
from student_trainer.teachers.client import TeacherRequestError
from student_trainer.teachers.http import _Replica
from student_trainer.teachers.label_logprobs import FLOOR
from student_trainer.teachers.openai import DEFAULT_CONTEXT
from student_trainer.teachers.remote import OutOfProtocol, RemoteTeacherClient, answer_flops, known_shape

PROBE_TEXT = "."  # what start-up classifies to learn the number of classes


class VllmClassifyClient(RemoteTeacherClient):
    """A sequence classifier served by vLLM (see the module docstring)."""

    health_path = "/health"
    shape: FlopsShape | None = None  # the FLOPs model, where the checkpoint is readable here

    async def _fetch_info(self, replica: _Replica) -> TeacherInfo:
        entry = await self._fetch_entry(replica)
        self.shape = known_shape(entry)
        probe = await self._post_json("/classify", self._body([PROBE_TEXT]))
        with self._in_protocol("/classify"):
            num_labels = len(_probabilities(probe, 1)[0])
        return TeacherInfo(
            name=self.model,
            num_layers=1,  # unknown, and no hidden states are served
            hidden_size=0,
            num_labels=num_labels,
            label_names=tuple(f"LABEL_{i}" for i in range(num_labels)),
            vocab_size=0,
            max_seq_length=int(entry.get("max_model_len") or DEFAULT_CONTEXT),
            flops_config=uncounted_flops(num_labels)
            if self.shape is None
            else dataclasses.asdict(self.shape),
            text_only=True,
        )

    async def infer(self, query: TeacherQuery | TextQuery) -> TeacherAnswer:
        """Every row in one request; the logits are the logarithms of the returned probabilities."""
        if not isinstance(query, TextQuery) or query.text_pair is not None:
            raise TeacherRequestError(f"teacher {self.model!r} (vLLM /classify) reads single texts only")
        if query.cls_layers or query.token_layers:
            raise TeacherRequestError(f"teacher {self.model!r} answers class logits only, not hidden states")
        answer = await self._post_json("/classify", self._body(query.text))
        with self._in_protocol("/classify"):
            probs = _probabilities(answer, len(query.text))
        logits = torch.tensor([[math.log(max(FLOOR, p)) for p in row] for row in probs], dtype=torch.float32)
        tokens = self._usage(answer)
        flops = answer_flops(self.shape, len(query.text), tokens)
        return TeacherAnswer(logits, None, None, teacher_flops=flops, tokens=tokens, padded_tokens=tokens)

    def _body(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.model, "input": list(texts)}


def _probabilities(answer: dict[str, Any], rows: int) -> list[list[float]]:
    """Each row's class probabilities, in input order (``index``)."""
    data = sorted(answer["data"], key=lambda item: item.get("index", 0))
    if len(data) != rows:
        raise OutOfProtocol(f"{len(data)} results for {rows} texts")
    probs = [[float(p) for p in item["probs"]] for item in data]
    if any(len(row) != len(probs[0]) or not row for row in probs):
        raise OutOfProtocol("rows with different numbers of classes")
    return probs
