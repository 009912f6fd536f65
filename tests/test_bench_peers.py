"""The pure parts of benchmarks/bench_peers.py: rounds, medians, the table, the one-line skip reason.

No peer is installed and nothing is served: venv creation is pointed at a stand-in interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402
from bench_peers import BEFORE, OURS, PEERS  # noqa: E402


def stand_in_python(tmp_path, *lines, code=1):
    """An executable that prints ``lines`` (to stderr) and exits ``code``, whatever it is asked to run."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + "".join(f"echo '{line}' >&2\n" for line in lines) + f"exit {code}\n")
    path.chmod(0o755)
    return path


def sample(server, seq_per_s, p99, threads=1, clients=4, p50=100.0):
    return {
        "server": server,
        "threads": threads,
        "clients": clients,
        "sequences_per_s": seq_per_s,
        "p50_ms": p50,
        "p99_ms": p99,
    }


def test_rounds_alternate_forward_and_reverse():
    assert bench_peers.round_orders([OURS, "kserve", "ray"], 4) == [
        [OURS, "kserve", "ray"],
        ["ray", "kserve", OURS],
        [OURS, "kserve", "ray"],
        ["ray", "kserve", OURS],
    ]


def test_medians_over_rounds_and_best_peer_per_cell():
    samples = [sample(OURS, v, p) for v, p in [(10, 900), (30, 100), (20, 300)]]
    samples += [sample("kserve", v, 50) for v in (5, 7, 6)]
    samples += [sample("ray", v, 400) for v in (12, 11, 40)]
    table = bench_peers.medians(samples)
    samples += [sample(BEFORE, v, 600) for v in (9, 8, 10)]  # an older checkout is no peer
    table = bench_peers.medians(samples)
    assert table[(OURS, 1, 4)] == {"sequences_per_s": 20, "p50_ms": 100, "p99_ms": 300, "rounds": 3}
    (row,) = bench_peers.comparison_rows(table, [1], [4])
    assert row["best_peer"] == "ray"  # by median seq/s (12), not by its one fast round (40)
    assert row["ours_over_best"] == pytest.approx(20 / 12)
    assert row["before_over_best"] == pytest.approx(9 / 12)
    assert (row["ours_p99_ms"], row["best_peer_p99_ms"], row["ours_p99_over_p50"]) == (300, 400, 3.0)


def test_table_shows_missing_cells_and_one_line_skips():
    table = bench_peers.medians([sample(OURS, 20.0, 300.0)])
    rows = bench_peers.comparison_rows(table, [1, 2], [4])
    text = bench_peers.format_table(rows, {"pytriton": "exited with code 1 before ready: boom"})
    lines = text.splitlines()
    assert "20.0" in lines[2] and "(none)" in lines[2]
    assert lines[3].split()[:3] == ["2", "4", "-"]  # no sample at 2 threads: a dash, not a crash
    assert lines[-1] == "skipped pytriton: exited with code 1 before ready: boom"
    assert "before" not in lines[0]  # no --before checkout ran: no column for it
    with_before = bench_peers.medians([sample(OURS, 20.0, 300.0), sample(BEFORE, 10.0, 500.0)])
    header = bench_peers.format_table(bench_peers.comparison_rows(with_before, [1], [4]), {}).splitlines()[0]
    assert "before/best" in header


def test_one_line_keeps_the_last_line_and_shortens_it():
    assert bench_peers.one_line("Collecting x\n\nERROR: No matching distribution for x\n") == (
        "ERROR: No matching distribution for x"
    )
    assert len(bench_peers.one_line("y" * 500)) == 160
    assert bench_peers.one_line("") == "no output"


def test_requests_carry_raw_text_in_each_servers_shape():
    sentences = [f"sentence {i}" for i in range(17)]
    bodies = bench_peers.request_bodies(sentences, PEERS["pytriton"].text_shape_tail)
    assert len(bodies) == 2  # whole requests of 8 only
    text = json.loads(bodies[1])["inputs"][0]
    assert text == {"name": "text", "datatype": "BYTES", "shape": [8, 1], "data": sentences[8:16]}
    assert json.loads(bench_peers.request_bodies(sentences)[0])["inputs"][0]["shape"] == [8]


def test_a_venv_that_cannot_be_made_is_one_line_and_leaves_no_stamp(tmp_path, monkeypatch):
    broken = stand_in_python(tmp_path, "Traceback (most recent call last):", "venv: no ensurepip")
    monkeypatch.setattr(sys, "executable", str(broken))
    with pytest.raises(bench_peers.Unavailable) as err:
        bench_peers.ensure_venv(PEERS["kserve"], tmp_path / "cache", reinstall=False)
    assert str(err.value) == "-m venv " + str(tmp_path / "cache/kserve/venv") + " failed: venv: no ensurepip"
    assert not (tmp_path / "cache" / "kserve" / "installed.txt").exists()


def test_a_venv_whose_stamp_matches_is_reused_without_running_pip(tmp_path, monkeypatch):
    home = tmp_path / "kserve"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").write_text("")
    (home / "installed.txt").write_text("\n".join(bench_peers.pinned_requirements(PEERS["kserve"])))
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # would fail if anything ran
    assert (
        bench_peers.ensure_venv(PEERS["kserve"], tmp_path, reinstall=False)
        == home / "venv" / "bin" / "python"
    )
    assert bench_peers.pinned_requirements(PEERS["kserve"])[0].startswith("torch==")  # torch alone, first


def test_a_peer_that_dies_before_ready_is_skipped_with_its_last_words(tmp_path):
    dying = stand_in_python(tmp_path, "loading", "ModuleNotFoundError: No module named kserve", code=3)
    args = argparse.Namespace(
        teacher="unused", max_batch_size=64, max_queue_delay_ms=5.0, max_seq_length=128, ready_timeout=30
    )
    log = tmp_path / "serve.log"
    serving = bench_peers.served_peer(PEERS["kserve"], dying, args, threads=1, log=log)
    with pytest.raises(bench_peers.Unavailable) as err, serving:
        pytest.fail("a dead server was reported ready")
    reason = "ModuleNotFoundError: No module named kserve"
    assert str(err.value) == f"kserve exited with code 3; see {log}: {reason}"


def test_an_exception_is_reported_by_its_first_line():
    err = ValueError(
        "Client error '404 Not Found' for url 'http://x'\nFor more information check: https://..."
    )
    assert bench_peers.first_line(err) == "Client error '404 Not Found' for url 'http://x'"
    assert bench_peers.first_line(KeyError()) == "KeyError"
