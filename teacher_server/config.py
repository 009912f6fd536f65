"""The service's YAML configuration, validated at the edge so a typo fails at start, not at 3 a.m.

```yaml
cache_max_bytes: 268435456        # teacher-output cache (0 = off)
teachers:
  - name: small
    path: ./teachers/bert-base-sst2   # local dir (relative to this file) or hub id
    revision: main
    device: cuda:0
    dtype: bf16
    max_batch_tokens: 16384
```
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.config_file import read_yaml_mapping
from shared.errors import UserError
from shared.model_path import looks_like_path
from shared.prompting import LabelPrompt

DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
# benchmarks/bench_pass_overhead.py (MiniLM-L6, SST-2, 1 and 2 threads): a pass costs 8-9 ms plus
# 0.15-0.24 ms per padded token, i.e. 35-63 tokens; of 8/32/64/none, 32 planned the fastest passes
# or within 6 % of them for 3-128 queued rows (8 was up to 28 % slower on a trainer's 3 rows).
CPU_PASS_OVERHEAD_TOKENS = 32
ACCELERATOR_PASS_OVERHEAD_TOKENS = 4096


class TeacherConfig(BaseModel):
    """One hosted teacher and the limits of its dynamic batcher."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    path: str = Field(min_length=1, description="local checkpoint dir or Hugging Face hub id")
    revision: str | None = None
    device: str = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_seq_length: int = Field(512, ge=1)
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward pass")
    max_batch_size: int = Field(64, ge=1, description="rows per forward pass and per request")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="how long an idle engine may wait for company (0: start at once)"
    )
    max_queue_size: int = Field(256, ge=1, description="queued requests before 429")
    max_output_mb: float = Field(
        256.0, gt=0, description="a request whose outputs would be larger is refused (422) before it runs"
    )
    dynamic_batching: bool = Field(True, description="false: every request runs alone (for comparisons)")
    batch_invariant: bool = Field(
        False, description="true: each row runs alone, so its answer is bit-identical whoever shares its pass"
    )
    pass_overhead_tokens: int | None = Field(
        None, ge=0, description="what one more forward pass costs, in padded tokens (default: by device)"
    )
    prompt: str | None = Field(
        None, description="a causal LM as a zero-shot teacher: its prompt, with {text} (and {text_pair})"
    )
    label_words: dict[str, list[str] | str] | None = Field(
        None, description="with prompt: class name -> the words whose next-token logits make its logit"
    )
    chat: bool = Field(False, description="with prompt: the prompt as the user's turn of the chat template")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE_PATTERN.match(device):
            raise ValueError(f"{device!r} is not cpu, cuda, cuda:N or mps")
        return device

    @property
    def effective_pass_overhead_tokens(self) -> int:
        """A pass costs next to nothing beyond its tokens on CPU; on a GPU, kernel launches cost
        about as much as a few thousand tokens of compute."""
        if self.pass_overhead_tokens is not None:
            return self.pass_overhead_tokens
        return CPU_PASS_OVERHEAD_TOKENS if self.device == "cpu" else ACCELERATOR_PASS_OVERHEAD_TOKENS

    @model_validator(mode="after")
    def _prompt_and_label_words(self) -> TeacherConfig:
        if self.prompt is None and (self.label_words is not None or self.chat):
            raise ValueError("label_words and chat need a prompt")
        try:
            self.label_prompt()
        except UserError as err:
            raise ValueError(str(err)) from None
        return self

    def label_prompt(self) -> LabelPrompt | None:
        """A prompted teacher's prompt (the shape the trainer's --teacher_prompt files have too)."""
        if self.prompt is None:
            return None
        raw = {"prompt": self.prompt, "label_words": self.label_words, "chat": self.chat}
        return LabelPrompt.from_mapping(raw, "prompt")

    @model_validator(mode="after")
    def _longest_sequence_fits_a_batch(self) -> TeacherConfig:
        if self.max_batch_tokens < self.max_seq_length:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= "
                f"max_seq_length ({self.max_seq_length})"
            )
        return self


class ServerConfig(BaseModel):
    """Everything ``teacher-server`` needs besides host, port and the API key."""

    model_config = ConfigDict(extra="forbid")

    teachers: list[TeacherConfig] = Field(min_length=1)
    cache_max_bytes: int = Field(256 * 2**20, ge=0, description="byte budget of the output cache; 0 = off")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="larger request bodies get 413")
    drain_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown: time to finish queued work")
    drain_grace_s: float = Field(
        1.0, ge=0, description="on SIGTERM: answer 503 (readiness and new requests) at least this long"
    )
    max_header_bytes: int = Field(
        64 * 2**10, ge=1024, description="a request line and headers longer than this get 431"
    )
    max_headers: int = Field(100, ge=1, description="a request with more headers gets 431")
    read_timeout_s: float = Field(
        60.0, gt=0, description="a request's headers, and then its body, must arrive within this (408)"
    )
    warmup: bool = Field(True, description="run each teacher once before reporting ready")

    @field_validator("teachers")
    @classmethod
    def _unique_names(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        names = [t.name for t in teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"teacher names must be unique, repeated: {duplicates}")
        return teachers


def one_line(err: ValidationError, where: str) -> UserError:
    """A pydantic error as the one line a user reads: where, which key, what is wrong."""
    first = err.errors(include_url=False)[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return UserError(f"{where}: {key}: {first['msg']}")


def teacher_entry(where: str, **fields: object) -> TeacherConfig:
    """One teacher's settings validated as in a config file (the local client's way in)."""
    try:
        return TeacherConfig.model_validate(fields)
    except ValidationError as err:
        raise one_line(err, where) from None


def load_config(path: str | Path) -> ServerConfig:
    """Read and validate a YAML config; any problem is one :class:`UserError` line naming file and key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "with a 'teachers' list")
    try:
        config = ServerConfig.model_validate(raw)
    except ValidationError as err:
        raise one_line(err, str(path)) from None
    for index, teacher in enumerate(config.teachers):
        teacher.path = _resolve_model_path(teacher.path, path.parent, f"{path}: teachers.{index}.path")
    return config


def _resolve_model_path(value: str, base: Path, where: str) -> str:
    """Relative local paths are relative to the config file; anything else not on disk is a hub id."""
    try:
        candidate = Path(value).expanduser()
    except RuntimeError as err:  # ~name of a user who does not exist
        raise UserError(f"{where}: {value!r}: cannot expand '~': no such user or home directory") from err
    if not candidate.is_absolute():
        candidate = base / candidate
    if candidate.exists():
        return str(candidate.resolve())
    if looks_like_path(value):
        raise UserError(f"{where}: no such directory: {value}")
    return value
