"""A stand-in for vLLM's OpenAI-compatible entry point, for tests that start "vLLM" as the project
does (:class:`~student_trainer.teachers.vllm_server.VllmServer`) without installing it.

:func:`fake_vllm_python` writes an executable that takes vLLM's command line (``-m ENTRY_POINT
--model DIR --served-model-name NAME ... --port PORT``) and serves :class:`~tests.fake_openai.FakeOpenAI`
there, listing ``DIR`` as the model's root (so the trainer counts its FLOPs). Like vLLM it runs a
second process beside the server (its "engine core"), so a test can see that the whole group stops.
It prints its command line, its ``VLLM_*`` environment and the engine core's pid first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import uvicorn

REPO = Path(__file__).resolve().parents[1]


def fake_vllm_python(folder: Path) -> Path:
    """An executable that stands where vLLM's python would."""
    path = folder / "fake-vllm-python"
    path.write_text(f'#!/bin/sh\nshift 2\nPYTHONPATH={REPO} exec {sys.executable} -m tests.fake_vllm "$@"\n')
    path.chmod(0o755)
    return path


def main() -> None:
    from tests.fake_openai import FakeOpenAI

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args()
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    vllm_env = {key: value for key, value in os.environ.items() if key.startswith("VLLM_")}
    print(f"argv {sys.argv[1:]}\nenv {vllm_env}\nengine core pid {engine.pid}", flush=True)
    fake = FakeOpenAI(model=args.served_model_name)
    fake.root = args.model
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
