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

``saved_fraction = 1 - spent / vanilla`` is the whole saving on the bill: dynamic KD, the
service's padding removal and its cache together. ``selection_saved_fraction = 1 - requested /
vanilla_unpadded`` is dynamic KD's share alone: the same rows, the same unpadded accounting, only
the choice of rows and teachers differs. Counts are integers so that summing them across DDP
ranks and across resumed runs is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import SimpleNamespace

import torch
import torch.distributed as dist

from shared.flops import BACKWARD_TO_FORWARD, encoder_forward_flops
from shared.teacher_api import TeacherAnswer, TeacherInfo, TeacherQuery
from student_trainer.kd.config import TEACHER_ROLES

KEYS = (
    *(f"teacher_flops_{role}" for role in TEACHER_ROLES),
    *(f"vanilla_flops_{role}" for role in TEACHER_ROLES),
    *(f"vanilla_unpadded_flops_{role}" for role in TEACHER_ROLES),
    *(f"requested_flops_{role}" for role in TEACHER_ROLES),
    *(f"teacher_rows_{role}" for role in TEACHER_ROLES),
    *(f"vanilla_rows_{role}" for role in TEACHER_ROLES),
    "teacher_requests",
    "teacher_cache_hits",
    "student_forward_flops",
    "student_backward_flops",
    "instances",
    "selected_instances",
)


def teacher_flops_config(info: TeacherInfo) -> SimpleNamespace:
    """The config fields the FLOPs formula needs, from a teacher's metadata.

    The FFN width is the metadata's ``intermediate_size``; a server that does not state it
    gets BERT's ``4·hidden``.
    """
    intermediate = info.intermediate_size or 4 * info.hidden_size
    return SimpleNamespace(
        hidden_size=info.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=info.num_layers,
        num_labels=info.num_labels,
    )


def teacher_counts(answers: Mapping[str, TeacherAnswer], rows: Mapping[str, int]) -> dict[str, int]:
    """One step's bill, as the teachers reported it."""
    counts = {f"teacher_flops_{role}": int(answer.teacher_flops) for role, answer in answers.items()}
    counts.update({f"teacher_rows_{role}": int(n) for role, n in rows.items()})
    counts["teacher_requests"] = len(answers)
    counts["teacher_cache_hits"] = sum(int(a.cache_hits) for a in answers.values())
    return counts


def requested_counts(
    teachers: Mapping[str, TeacherInfo], queries: Mapping[str, TeacherQuery]
) -> dict[str, int]:
    """What the rows sent cost at their real lengths through the whole teacher (the trainer
    always asks for logits), cache or not."""
    return {
        f"requested_flops_{role}": encoder_forward_flops(
            teacher_flops_config(teachers[role]), query.attention_mask.sum(dim=1).tolist()
        )
        for role, query in queries.items()
    }


def vanilla_counts(
    teachers: Mapping[str, TeacherInfo], seq_lens: list[int], padded_len: int
) -> dict[str, int]:
    """What vanilla KD would have spent on this batch: every row through every baseline teacher,
    padded to ``padded_len`` as collated and, as the lower bound, at its real length."""
    counts: dict[str, int] = {}
    for role, info in teachers.items():
        config = teacher_flops_config(info)
        counts[f"vanilla_flops_{role}"] = encoder_forward_flops(config, [padded_len] * len(seq_lens))
        counts[f"vanilla_unpadded_flops_{role}"] = encoder_forward_flops(config, seq_lens)
        counts[f"vanilla_rows_{role}"] = len(seq_lens)
    return counts


def student_counts(config: object, batch_size: int, seq_len: int) -> dict[str, int]:
    """The student's forward on the padded batch and its backward (2 × forward)."""
    forward = encoder_forward_flops(config, [seq_len] * batch_size, with_head=True)  # type: ignore[arg-type]
    return {
        "student_forward_flops": forward,
        "student_backward_flops": BACKWARD_TO_FORWARD * forward,
        "instances": batch_size,
    }


def all_reduce_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Sum one step's counts over every DDP rank (identity when not distributed)."""
    full = {key: int(counts.get(key, 0)) for key in KEYS}
    if not (dist.is_available() and dist.is_initialized()):
        return full
    tensor = torch.tensor([full[key] for key in KEYS], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return dict(zip(KEYS, (int(v) for v in tensor.tolist()), strict=True))


class FlopsLedger:
    """Running totals of :data:`KEYS`; part of every checkpoint."""

    def __init__(self, totals: Mapping[str, int] | None = None):
        self.totals = {key: 0 for key in KEYS}
        if totals:
            self.add(totals)

    def add(self, counts: Mapping[str, int]) -> None:
        unknown = set(counts) - set(KEYS)
        if unknown:
            raise KeyError(f"unknown ledger keys {sorted(unknown)}")
        for key, value in counts.items():
            self.totals[key] += int(value)

    def _sum(self, prefix: str, roles: Iterable[str] = TEACHER_ROLES) -> int:
        return sum(self.totals[f"{prefix}_{role}"] for role in roles)

    @property
    def teacher_flops(self) -> int:
        return self._sum("teacher_flops")

    @property
    def vanilla_flops(self) -> int:
        return self._sum("vanilla_flops")

    @property
    def vanilla_unpadded_flops(self) -> int:
        return self._sum("vanilla_unpadded_flops")

    @property
    def requested_flops(self) -> int:
        return self._sum("requested_flops")

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
    def selection_saved_fraction(self) -> float | None:
        """``1 - requested / vanilla_unpadded``: what dynamic KD's choices alone save."""
        return self._saved(self.requested_flops, self.vanilla_unpadded_flops)

    def state_dict(self) -> dict[str, int]:
        return dict(self.totals)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.totals = {key: 0 for key in KEYS}
        self.add(state)

    def summary(self) -> dict[str, float | int | None]:
        """Totals plus the derived numbers results.json and the human summary report."""
        return {
            **self.totals,
            "teacher_flops_spent": self.teacher_flops,
            "teacher_flops_vanilla": self.vanilla_flops,
            "teacher_flops_saved_fraction": self.saved_fraction,
            "teacher_flops_vanilla_unpadded": self.vanilla_unpadded_flops,
            "teacher_flops_saved_fraction_unpadded": self.saved_fraction_unpadded,
            "teacher_flops_requested": self.requested_flops,
            "teacher_flops_saved_fraction_selection": self.selection_saved_fraction,
            "student_flops": self.totals["student_forward_flops"] + self.totals["student_backward_flops"],
        }
