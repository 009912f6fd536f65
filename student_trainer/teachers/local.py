"""The in-process teacher backend: the service's own engine, no network in between.

Same interface and outputs as the HTTP client, for offline runs and for measuring what the
service costs over a plain forward pass. The engine runs the query as one pass (without the
columns that are padding in every row, as the service does). Outputs (up to float rounding),
their shapes and ``tokens`` match the service; ``teacher_flops`` and ``padded_tokens`` match
when the service runs the request alone in one pass. Otherwise they differ, usually in the
service's favour: it may split a request's rows into several passes and batch rows of
similar length from concurrent requests, each row paying its share of the pass it rode in.
The service also has a result cache (``cache_hits``); this backend has none.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from teacher_engine.engine import TeacherEngine
from teacher_server.config import teacher_entry


class LocalTeacherClient:
    """A :class:`~student_trainer.teachers.client.TeacherClient` that runs the checkpoint here.

    HTTP-only options (timeouts, retries, API keys) are accepted and ignored so one set of
    trainer options works with both backends. ``prompt``, ``label_words`` and ``chat``
    make a causal LM a prompted teacher, as in the service's config.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        device: str = "cpu",
        dtype: str = "fp32",
        max_seq_length: int = 512,
        revision: str | None = None,
        prompt: str | None = None,
        label_words: dict[str, list[str]] | None = None,
        chat: bool = False,
        **ignored_http_options: object,
    ):
        self.name = name
        self.config = teacher_entry(
            f"teacher {name}",
            name=name,
            path=str(path),
            device=device,
            dtype=dtype,
            max_seq_length=max_seq_length,
            revision=revision,
            prompt=prompt,
            label_words=label_words,
            chat=chat,
        )
        self.info: TeacherInfo | None = None
        self._engine: TeacherEngine | None = None

    async def start(self, ready_timeout_s: float = 300.0) -> TeacherInfo:
        """Load the checkpoint (in a thread, bounded by ``ready_timeout_s``) and return its info."""
        if self._engine is None:
            load = asyncio.to_thread(TeacherEngine.from_config, self.config)
            self._engine = await asyncio.wait_for(load, timeout=ready_timeout_s)
            self.info = self._engine.info
        return self._engine.info

    async def infer(self, query: TeacherQuery | TextQuery) -> TeacherAnswer:
        """Run the query in a worker thread so the caller's event loop keeps going; text is
        tokenized by the engine's own tokenizer, as the service does."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("LocalTeacherClient.start() must be awaited before infer()")

        def run() -> TeacherAnswer:
            if isinstance(query, TextQuery):
                return engine.run(query.tokenized(*engine.tokenize(query.text, query.text_pair)))
            return engine.run(query)

        return await asyncio.to_thread(run)

    async def aclose(self) -> None:
        self._engine = None
