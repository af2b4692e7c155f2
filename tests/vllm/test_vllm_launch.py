"""`serve --engine vllm` in the main venv (no vLLM needed): export once, exec `vllm serve` on it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("convllava_jp.model", reason="this package's transformers is not installed (vLLM venv)")

from convllava_jp.cli import main  # noqa: E402
from convllava_jp.vllm_plugin import launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from test_export import build_model_dir  # noqa: E402


@pytest.fixture
def fake_vllm(tmp_path):
    path = tmp_path / "bin" / "vllm"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_serve_engine_vllm_exports_once_and_execs_vllm(tiny_world, tmp_path, fake_vllm, monkeypatch):
    model = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2")
    monkeypatch.setenv("CONVLLAVA_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda exe, argv: calls.append(argv))
    argv = ["serve", "--model", str(model), "--engine", "vllm", "--vllm-bin", str(fake_vllm)]
    assert main([*argv, "--port", "8123", "--api-key", "k", "--vllm-arg=--max-model-len=256"]) == 0
    served = Path(calls[0][2])
    assert json.loads((served / "config.json").read_text())["model_type"] == "fast_vlm"
    assert calls[0][:5] == [str(fake_vllm), "serve", str(served), "--model-impl", "transformers"]
    assert calls[0][calls[0].index("--port") + 1] == "8123"
    assert calls[0][calls[0].index("--served-model-name") + 1] == "m"
    assert calls[0][calls[0].index("--api-key") + 1] == "k"
    assert calls[0][-1] == "--max-model-len=256"
    # The export carries the CLI's template (llm-jp-v1 by default) as its one chat template.
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(served).chat_template
    assert isinstance(template, str) and "システム" in template and "{% generation" not in template
    # A second start reuses the export (same files); an exported dir is served as it is.
    stamp = (served / "config.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert calls[1][2] == str(served) and (served / "config.json").stat().st_mtime_ns == stamp
    assert main(["serve", "--model", str(served), "--engine", "vllm", "--vllm-bin", str(fake_vllm)]) == 0
    assert calls[2][2] == str(served)


def test_export_cache_key_follows_the_model_files(tiny_world, tmp_path):
    model = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2")
    first = launch.export_cache_dir(model, tmp_path / "c")
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    assert launch.export_cache_dir(model, tmp_path / "c") != first


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(launch.VLLM_BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launch.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(launch.ConfigError, match="--vllm-bin"):
        launch.find_vllm(str(tmp_path / "nope"))
    assert os.environ["PATH"] == str(tmp_path)
