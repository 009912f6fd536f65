"""The on-disk store of teacher answers: reuse across runs, damaged entries refused, the size bound,
two processes writing at once."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sqlite3

import pytest
import torch

from shared.errors import UserError
from shared.prompting import LabelPrompt
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from student_trainer.teachers.store import AnswerStore, StoredAnswer, entry_key
from student_trainer.teachers.stored_client import StoredTeacherClient

INFO = TeacherInfo("t", 2, 8, 2, ("neg", "pos"), 100, 64)


class CountingTeacher:
    """Logits that are a function of the text; remembers every row it was asked."""

    def __init__(self, prompt: LabelPrompt | None = None):
        self.info: TeacherInfo | None = None
        self.asked: list[str] = []
        self.prompt = prompt

    async def start(self, ready_timeout_s: float) -> TeacherInfo:
        self.info = INFO
        return INFO

    async def infer(self, query):
        self.asked += query.text
        logits = torch.tensor([[len(t) / 3, -len(t) / 7] for t in query.text])
        rows = len(query.text)
        return TeacherAnswer(logits, None, None, teacher_flops=10 * rows, tokens=5 * rows, padded_tokens=0)

    async def aclose(self) -> None:
        pass


def ask(client, *queries) -> list[TeacherAnswer]:
    async def main():
        await client.start(1.0)
        return [await client.infer(q) for q in queries]

    return asyncio.run(main())


def test_a_second_identical_run_is_answered_wholly_from_the_store(tmp_path) -> None:
    texts = [f"row {i} " * (i + 1) for i in range(10)]
    first_teacher, second_teacher = CountingTeacher(), CountingTeacher()
    first = ask(StoredTeacherClient(first_teacher, AnswerStore(tmp_path / "s.sqlite")), TextQuery(texts[:6]),
                TextQuery(texts[4:]))  # fmt: skip
    second = ask(StoredTeacherClient(second_teacher, AnswerStore(tmp_path / "s.sqlite")), TextQuery(texts))
    assert first_teacher.asked == texts and second_teacher.asked == []  # rows 4, 5: once, then stored
    assert (first[1].store_hits, first[1].store_lookups, first[1].tokens) == (2, 6, 20)
    assert (second[0].store_hits, second[0].store_lookups, second[0].tokens, second[0].teacher_flops) == (
        10, 10, 0, 0,
    )  # fmt: skip
    assert (first[1].store_tokens, second[0].store_tokens) == (10, 50)  # their tokens when first answered
    torch.testing.assert_close(second[0].logits, torch.cat([first[0].logits, first[1].logits[2:]]))


def test_another_prompt_or_teacher_is_another_answer(tmp_path) -> None:
    store = AnswerStore(tmp_path / "s.sqlite")
    ask(StoredTeacherClient(CountingTeacher(), store), TextQuery(["a film"]))
    words = {"neg": [" no"], "pos": [" yes"]}
    prompted = CountingTeacher(LabelPrompt.from_mapping({"prompt": "{text}?", "label_words": words}, "p"))
    (answer,) = ask(StoredTeacherClient(prompted, store), TextQuery(["a film"]))
    assert answer.store_hits == 0 and prompted.asked == ["a film"]


def test_token_id_rows_are_keyed_without_their_padding(tmp_path) -> None:
    class IdTeacher(CountingTeacher):
        async def infer(self, query):
            self.asked.append(query.input_ids.shape[0])
            return TeacherAnswer(query.input_ids[:, :2].float(), None, None, teacher_flops=1, tokens=1,
                                 padded_tokens=0)  # fmt: skip

    teacher = IdTeacher()
    padded = TeacherQuery(
        torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    )
    tight = TeacherQuery(torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.long))
    _, again = ask(StoredTeacherClient(teacher, AnswerStore(tmp_path / "s.sqlite")), padded, tight)
    assert teacher.asked == [2] and again.store_hits == 1
    torch.testing.assert_close(again.logits, torch.tensor([[7.0, 8.0]]))


def test_hidden_state_queries_bypass_the_store(tmp_path) -> None:
    teacher = CountingTeacher()
    client = StoredTeacherClient(teacher, AnswerStore(tmp_path / "s.sqlite"))
    ask(client, TextQuery(["x"], cls_layers=(1,)), TextQuery(["x"], cls_layers=(1,)))
    assert teacher.asked == ["x", "x"]


def test_a_damaged_entry_is_refused_and_asked_again_not_used(tmp_path, caplog) -> None:
    path = tmp_path / "s.sqlite"
    ask(StoredTeacherClient(CountingTeacher(), AnswerStore(path)), TextQuery(["a film", "a play"]))
    with sqlite3.connect(path) as db:  # one flipped bit in one stored value
        key, value = db.execute("SELECT key, value FROM answers LIMIT 1").fetchone()
        db.execute("UPDATE answers SET value = ? WHERE key = ?", (value[:-1] + bytes([value[-1] ^ 1]), key))
    teacher, store = CountingTeacher(), AnswerStore(path)
    with caplog.at_level(logging.WARNING):
        (answer,) = ask(StoredTeacherClient(teacher, store), TextQuery(["a film", "a play"]))
    assert len(teacher.asked) == 1 and answer.store_hits == 1 and store.refused == 1
    assert "damaged" in caplog.text
    torch.testing.assert_close(answer.logits, torch.tensor([[2.0, -6 / 7], [2.0, -6 / 7]]))
    assert store.get_many([entry_key("x", 1)]) == {} and store.refused == 1  # replaced by a good entry


def test_a_file_that_is_not_a_store_is_refused_with_what_to_do(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match="--teacher_store none"):
        AnswerStore(path)


def test_the_size_bound_evicts_the_least_recently_used(tmp_path) -> None:
    answer = StoredAnswer((0.5, -0.5), 3)
    one = len(entry_key("f", 0)) + len(answer.encode()) + 40
    store = AnswerStore(tmp_path / "s.sqlite", max_bytes=10 * one)
    store.put_many({entry_key("f", i): answer for i in range(8)})
    assert store.get_many([entry_key("f", 0)])  # row 0 is used again: now the most recent
    store.put_many({entry_key("f", i): answer for i in range(8, 12)})  # 12 entries > 10: evict to 9
    kept = store.get_many([entry_key("f", i) for i in range(12)])
    assert store.stored_bytes() == len(kept) * one == 9 * one
    gone = [i for i in range(12) if entry_key("f", i) not in kept]
    assert len(gone) == 3 and all(1 <= i <= 7 for i in gone)  # the oldest, never row 0 used again


def write_entries(path: str, start: int, stop: int, barrier) -> None:
    store = AnswerStore(path)
    barrier.wait()
    for i in range(start, stop, 10):  # many small transactions, interleaved with the other process's
        store.put_many({entry_key("f", j): StoredAnswer((float(j), 1.0), j) for j in range(i, i + 10)})


def test_two_processes_writing_at_once_lose_and_damage_nothing(tmp_path) -> None:
    path = str(tmp_path / "s.sqlite")
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    writers = [
        spawn.Process(target=write_entries, args=(path, a, b, barrier)) for a, b in ((0, 400), (200, 600))
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    store = AnswerStore(path)
    found = store.get_many([entry_key("f", j) for j in range(600)])
    assert len(found) == 600 and store.refused == 0
    assert all(found[entry_key("f", j)] == StoredAnswer((float(j), 1.0), j) for j in range(600))
    one = len(entry_key("f", 0)) + len(StoredAnswer((0.0, 0.0), 0).encode()) + 40
    assert store.stored_bytes() == 600 * one  # the running total saw each entry exactly once
