"""The FLOPs ledger: what the teachers cost, what vanilla KD would have cost, what the student cost.

Definitions (forward FLOPs from :func:`shared.flops.encoder_forward_flops`, 2 FLOPs per
multiply-add, backward = 2 × forward):

* **teacher FLOPs spent**: the sum of ``teacher_flops`` the teachers reported for every answer
  they returned. The service counts what it actually ran (padded tokens, layers run, cache
  hits free), so this is the real bill, not an estimate.
* **teacher FLOPs requested**: what the rows the trainer sent would cost at their real token
  counts, whoever answers them and however: the bill of dynamic KD's choices alone, before
  the service's padding and its output cache (which, from the second epoch on, answers rows
  it has seen for free — a saving any KD run with a cache would get, not dynamic KD's).
* **vanilla KD FLOPs**: what the same teachers would have spent on the same batches without
  dynamic KD: every instance of every batch, padded as the trainer collated it (``B × L``), through
  the whole encoder and head of *every teacher the method's baseline uses* — the teacher itself
  for ``small``/``large``, both teachers for ``ensemble``/``hard``/``soft``/``soft-batch`` (the
  reference implementation ran both teachers on the full batch). Nothing for ``--no_kd``.
* **vanilla KD FLOPs, unpadded**: the same rows at their real token counts — what vanilla KD
  would cost on a server that wastes nothing on padding (and caches nothing).
* **student FLOPs**: the student's forward on the padded batch ``B × L`` (all its layers and
  its head) and its backward at 2 × that. The hidden-size projections are left out (< 0.1 %).

**Teachers with their own vocabulary** are sent raw text and count their own tokens: the service
reports the total (``tokens``) of each answer, kept as ``teacher_tokens_<role>`` beside the
student's tokens of the same rows (``sent_student_tokens_<role>``). *Requested* spreads an
answer's total over its rows in proportion to their student lengths (the total is exact, the
split only moves the small attention term). *Vanilla* covers rows never sent, whose teacher
lengths nobody measured, count at their student lengths scaled by the run's observed ratio of
teacher to student tokens so far (1 until a row was sent) — an estimate, exact in total
whenever the unsent rows tokenize like the sent ones; rows that were sent count as requested,
and the padded bound pads every row to the longest of these lengths.

``method_saved_fraction = 1 - requested / vanilla_unpadded`` is what dynamic KD's choices of rows
and teachers save, like for like: the same rows, the same unpadded accounting, no cache.
``service_saved_fraction = 1 - spent / requested`` is what the service then saves on the rows it
is sent (its output cache, packed passes, early exit; negative where its padding costs more).
``saved_fraction = 1 - spent / vanilla`` is the whole bill against vanilla KD padded as the
trainer collates it: both of those and the padding removal together.

**The store of teacher answers** (``student_trainer.teachers.store``): rows it answers reach no
teacher and cost nothing (no FLOPs spent, no tokens counted); ``teacher_store_hits`` of
``teacher_store_lookups`` rows looked up. They are still requested: at the tokens their teacher
counted when it answered them (kept with the answer, ``stored_tokens_<role>``), as rows the
service's cache answers count at theirs.

Counts are integers so that summing them across DDP ranks and across resumed runs is exact.
Per-teacher counts are keyed by the teacher's name: ``small`` and ``large`` always (so results
keep one shape), any other name of a ladder besides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from shared.flops import BACKWARD_TO_FORWARD, FlopsShape, encoder_forward_flops
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery, TextQuery
from student_trainer.kd.config import TEACHER_ROLES

PER_TEACHER = (
    "teacher_flops",
    "vanilla_flops",
    "vanilla_unpadded_flops",
    "requested_flops",
    "teacher_rows",
    "vanilla_rows",
    "teacher_tokens",
    "stored_tokens",
    "sent_student_tokens",
)
RUN_KEYS = (
    "teacher_requests",
    "teacher_cache_hits",
    "teacher_store_hits",
    "teacher_store_lookups",
    "student_forward_flops",
    "student_backward_flops",
    "instances",
    "selected_instances",
)


def ledger_keys(roles: Iterable[str]) -> tuple[str, ...]:
    """Every count of a run whose teachers are ``roles``: each :data:`PER_TEACHER` entry per role."""
    roles = tuple(roles)
    return (*(f"{prefix}_{role}" for prefix in PER_TEACHER for role in roles), *RUN_KEYS)


KEYS = ledger_keys(TEACHER_ROLES)  # the paper's two teachers (other names add their own keys)


def teacher_flops_config(info: TeacherInfo) -> SimpleNamespace:
    """The config fields the FLOPs formula needs, from a teacher's metadata.

    The teacher's own ``flops_config`` when it publishes one (its family's terms: DeBERTa's
    relative attention, ModernBERT's gated FFN, …); otherwise a BERT of its width and depth
    whose FFN width is the metadata's ``intermediate_size``, or BERT's ``4·hidden``.
    """
    if info.flops_config:
        return SimpleNamespace(**info.flops_config)
    intermediate = info.intermediate_size or 4 * info.hidden_size
    return SimpleNamespace(
        hidden_size=info.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=info.num_layers,
        num_labels=info.num_labels,
    )


UNCOUNTED = "remote"  # the model_type of a teacher whose architecture the trainer cannot see


def uncounted_flops(num_labels: int) -> dict[str, Any]:
    """The ``flops_config`` of a teacher served elsewhere without its architecture: zero FLOPs,
    so its cost is what its server reports (tokens) and the rows sent (calls)."""
    return dataclasses.asdict(FlopsShape(UNCOUNTED, 0, 0, 0, num_labels))


def is_uncounted(info: TeacherInfo) -> bool:
    return (info.flops_config or {}).get("model_type") == UNCOUNTED


def scaled_lengths(lengths: list[int], ratio: float) -> list[int]:
    """``lengths`` × ``ratio`` in whole tokens, rounded so that the total rounds exactly once."""
    out, done, total = [], 0, 0.0
    for n in lengths:
        total += n * ratio
        out.append(round(total) - done)
        done += out[-1]
    return out


def teacher_counts(
    answers: Mapping[str, TeacherAnswer], rows: Mapping[str, int], student_tokens: Mapping[str, int]
) -> dict[str, int]:
    """One step's bill, as the teachers reported it, and their own token counts beside the
    student's tokens of the same rows."""
    counts = {f"teacher_flops_{role}": int(answer.teacher_flops) for role, answer in answers.items()}
    counts.update({f"teacher_rows_{role}": int(n) for role, n in rows.items()})
    counts.update({f"teacher_tokens_{role}": int(answer.tokens) for role, answer in answers.items()})
    counts.update({f"stored_tokens_{role}": int(answer.store_tokens) for role, answer in answers.items()})
    counts.update({f"sent_student_tokens_{role}": int(student_tokens[role]) for role in answers})
    counts["teacher_requests"] = len(answers)
    counts["teacher_cache_hits"] = sum(int(a.cache_hits) for a in answers.values())
    counts["teacher_store_hits"] = sum(int(a.store_hits) for a in answers.values())
    counts["teacher_store_lookups"] = sum(int(a.store_lookups) for a in answers.values())
    return counts


def sent_lengths(
    query: TeacherQuery | TextQuery, answer: TeacherAnswer, student_lengths: list[int]
) -> list[int]:
    """Each sent row's length in the teacher's tokens: the query's own for ids; for text, the
    answer's total (the store's rows included) spread in proportion to the rows' student lengths
    (see the module docstring)."""
    if isinstance(query, TeacherQuery):
        return query.attention_mask.sum(dim=1).tolist()
    tokens = answer.tokens + answer.store_tokens
    return scaled_lengths(student_lengths, tokens / max(1, sum(student_lengths)))


def text_batch_lengths(
    student_lengths: list[int], ratio: float, sent_rows: list[int], sent: list[int]
) -> list[int]:
    """A text teacher's length of every row of a batch: as measured for the rows it was sent,
    the student's length × ``ratio`` (teacher tokens per student token) for the others."""
    lengths = scaled_lengths(student_lengths, ratio)
    for row, n in zip(sent_rows, sent, strict=True):
        lengths[row] = n
    return lengths


def requested_counts(teachers: Mapping[str, TeacherInfo], sent: Mapping[str, list[int]]) -> dict[str, int]:
    """What the rows sent cost at their real lengths (``sent``: each teacher's own, see
    :func:`sent_lengths`) through the whole teacher (the trainer always asks for logits), cache or not."""
    return {
        f"requested_flops_{role}": encoder_forward_flops(teacher_flops_config(teachers[role]), lengths)
        for role, lengths in sent.items()
    }


def row_costs(teachers: Mapping[str, TeacherInfo], lengths: list[int]) -> dict[str, list[int]]:
    """Each row's FLOPs at its real length on each teacher (what :func:`requested_counts` and
    the unpadded :func:`vanilla_counts` add up): what a teacher budget pays per row."""
    return {
        role: [encoder_forward_flops(teacher_flops_config(info), [n]) for n in lengths]
        for role, info in teachers.items()
    }


def vanilla_counts(
    teachers: Mapping[str, TeacherInfo],
    seq_lens: list[int],
    padded_len: int,
    text_lengths: Mapping[str, list[int]] | None = None,
) -> dict[str, int]:
    """What vanilla KD would have spent on this batch: every row through every baseline teacher,
    padded to ``padded_len`` as collated and, as the lower bound, at its real length. A teacher
    sent text has its own lengths (``text_lengths``, see :func:`text_batch_lengths`) and would pad
    to the longest of them."""
    counts: dict[str, int] = {}
    for role, info in teachers.items():
        config = teacher_flops_config(info)
        lens = (text_lengths or {}).get(role, seq_lens)
        padded = padded_len if lens is seq_lens else max(lens, default=0)
        counts[f"vanilla_flops_{role}"] = encoder_forward_flops(config, [padded] * len(lens))
        counts[f"vanilla_unpadded_flops_{role}"] = encoder_forward_flops(config, lens)
        counts[f"vanilla_rows_{role}"] = len(lens)
    return counts


def student_counts(config: object, batch_size: int, seq_len: int) -> dict[str, int]:
    """The student's forward on the padded batch and its backward (2 × forward)."""
    forward = encoder_forward_flops(config, [seq_len] * batch_size, with_head=True)  # type: ignore[arg-type]
    return {
        "student_forward_flops": forward,
        "student_backward_flops": BACKWARD_TO_FORWARD * forward,
        "instances": batch_size,
    }


def all_reduce_counts(counts: Mapping[str, int], keys: tuple[str, ...] = KEYS) -> dict[str, int]:
    """Sum one step's counts over every DDP rank (identity when not distributed)."""
    full = {key: int(counts.get(key, 0)) for key in keys}
    if not (dist.is_available() and dist.is_initialized()):
        return full
    tensor = torch.tensor([full[key] for key in keys], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return dict(zip(keys, (int(v) for v in tensor.tolist()), strict=True))


class FlopsLedger:
    """Running totals of :func:`ledger_keys` of the run's teachers; part of every checkpoint."""

    def __init__(self, totals: Mapping[str, int] | None = None, roles: Iterable[str] = TEACHER_ROLES):
        self.roles = tuple(roles)
        self.keys = ledger_keys(self.roles)
        self.totals = {key: 0 for key in self.keys}
        if totals:
            self.add(totals)

    def add(self, counts: Mapping[str, int]) -> None:
        unknown = set(counts) - set(self.keys)
        if unknown:
            raise KeyError(f"unknown ledger keys {sorted(unknown)}")
        for key, value in counts.items():
            self.totals[key] += int(value)

    def total(self, prefix: str) -> int:
        """``prefix``'s count summed over the teachers (``teacher_rows``: the calls, …)."""
        return sum(self.totals[f"{prefix}_{role}"] for role in self.roles)

    @property
    def teacher_flops(self) -> int:
        return self.total("teacher_flops")

    @property
    def vanilla_flops(self) -> int:
        return self.total("vanilla_flops")

    @property
    def vanilla_unpadded_flops(self) -> int:
        return self.total("vanilla_unpadded_flops")

    @property
    def requested_flops(self) -> int:
        return self.total("requested_flops")

    @staticmethod
    def _saved(spent: int, vanilla: int) -> float | None:
        return None if vanilla == 0 else 1.0 - spent / vanilla

    @property
    def saved_fraction(self) -> float | None:
        """``1 - spent / vanilla``; None when no teacher was used (nothing to compare)."""
        return self._saved(self.teacher_flops, self.vanilla_flops)

    @property
    def saved_fraction_unpadded(self) -> float | None:
        """``1 - spent / vanilla_unpadded``: the bill against vanilla KD without padding."""
        return self._saved(self.teacher_flops, self.vanilla_unpadded_flops)

    @property
    def method_saved_fraction(self) -> float | None:
        """``1 - requested / vanilla_unpadded``: what dynamic KD's choices save, cache and padding aside."""
        return self._saved(self.requested_flops, self.vanilla_unpadded_flops)

    @property
    def service_saved_fraction(self) -> float | None:
        """``1 - spent / requested``: what the service saves on the rows it is sent."""
        return self._saved(self.teacher_flops, self.requested_flops)

    def token_ratio(self, role: str, step: Mapping[str, int]) -> float:
        """Teacher tokens per student token over the rows sent to ``role`` so far, this step's
        ``counts`` included; 1 before any was sent."""
        teacher = sum(self.totals[f"{kind}_{role}"] + step.get(f"{kind}_{role}", 0)
                      for kind in ("teacher_tokens", "stored_tokens"))  # fmt: skip
        student = self.totals[f"sent_student_tokens_{role}"] + step.get(f"sent_student_tokens_{role}", 0)
        return teacher / student if student else 1.0

    def state_dict(self) -> dict[str, int]:
        return dict(self.totals)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.totals = {key: 0 for key in self.keys}
        self.add(state)

    def summary(self) -> dict[str, float | int | None]:
        """Totals plus the derived numbers results.json and the human summary report."""
        return {
            **self.totals,
            "teacher_flops_saved_by_method": self.method_saved_fraction,
            "teacher_flops_saved_by_service": self.service_saved_fraction,
            "teacher_flops_requested": self.requested_flops,
            "teacher_flops_vanilla_unpadded": self.vanilla_unpadded_flops,
            "teacher_flops_spent": self.teacher_flops,
            "teacher_flops_vanilla": self.vanilla_flops,
            "teacher_flops_saved_fraction": self.saved_fraction,
            "teacher_flops_saved_fraction_unpadded": self.saved_fraction_unpadded,
            "student_flops": self.totals["student_forward_flops"] + self.totals["student_backward_flops"],
            "teacher_store_hit_rate": self.store_hit_rate,
        }

    def budget_spend(self, unit: str) -> tuple[int, int]:
        """What a teacher budget in ``unit`` has spent and vanilla KD's figure beside it: requested
        and unpadded vanilla FLOPs; calls (rows sent) and vanilla's rows; the tokens the teachers
        counted (a budget in tokens is absolute: no vanilla figure)."""
        return {
            "flops": (self.requested_flops, self.vanilla_unpadded_flops),
            "calls": (self.total("teacher_rows"), self.total("vanilla_rows")),
            "tokens": (self.total("teacher_tokens"), 0),
        }[unit]

    @property
    def store_hit_rate(self) -> float | None:
        """The share of rows looked up in the store of teacher answers that it answered."""
        lookups = self.totals["teacher_store_lookups"]
        return self.totals["teacher_store_hits"] / lookups if lookups else None
