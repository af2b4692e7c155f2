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


def _fake_env(tmp_path, has_plugin: bool) -> Path:
    """A `vllm` script whose interpreter line names a `python` that answers the plugin check."""
    python = tmp_path / "env" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexit {0 if has_plugin else 1}\n")
    python.chmod(0o755)
    vllm = tmp_path / "env" / "vllm"
    vllm.write_text(f"#!{python}\nexit 0\n")
    vllm.chmod(0o755)
    return vllm


def test_plugin_road_serves_the_model_dir_itself(tiny_world, tmp_path, monkeypatch):
    """With the plugin in vLLM's env, `auto` serves the dir as it is (keep-aspect: no export can),
    with our chat template as one string and the template's stop ids in the generation config."""
    from convllava_jp.model.model_dir import load_processor
    from convllava_jp.vllm_plugin.support import served_chat_template

    model = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2", mode="keep-aspect")
    vllm = _fake_env(tmp_path, has_plugin=True)
    monkeypatch.setenv("CONVLLAVA_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(launch.os, "execv", lambda exe, argv: calls.append(argv))
    assert main(["serve", "--model", str(model), "--engine", "vllm", "--vllm-bin", str(vllm)]) == 0
    argv = calls[0]
    assert argv[:3] == [str(vllm), "serve", str(model)] and "--model-impl" not in argv
    processor = load_processor(model)
    template = Path(argv[argv.index("--chat-template") + 1]).read_text(encoding="utf-8")
    assert template == served_chat_template(processor)
    generation = Path(argv[argv.index("--generation-config") + 1]) / "generation_config.json"
    eos = json.loads(generation.read_text())["eos_token_id"]
    assert set(processor.stop_token_ids(processor.default_template())) <= set(eos)
    # --template picks another template; the files are cached per template
    assert (
        main(
            [
                "serve",
                "--model",
                str(model),
                "--engine",
                "vllm",
                "--vllm-bin",
                str(vllm),
                "--template",
                "qwen3",
            ]
        )
        == 0
    )
    other = Path(calls[1][calls[1].index("--chat-template") + 1])
    assert other != Path(argv[argv.index("--chat-template") + 1])
    assert other.read_text(encoding="utf-8") == served_chat_template(processor, "qwen3")


def test_plugin_road_without_the_plugin_is_a_clear_error(tiny_world, tmp_path):
    model = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2")
    vllm = _fake_env(tmp_path, has_plugin=False)
    assert not launch.has_plugin(str(vllm))
    with pytest.raises(launch.ConfigError, match="pip install --no-deps convllava-jp"):
        launch.choose_road("plugin", model, str(vllm))
    # auto falls back to the export road; export is always the export road
    assert launch.choose_road("auto", model, str(vllm)) == "export"
    assert launch.choose_road("export", model, str(_fake_env(tmp_path / "b", has_plugin=True))) == "export"


def test_auto_road_prefers_the_plugin_and_serves_exports_as_they_are(tiny_world, tmp_path, monkeypatch):
    model = build_model_dir(tmp_path / "m", tiny_world / "tokenizer", "gpt2")
    vllm = str(_fake_env(tmp_path, has_plugin=True))
    assert launch.has_plugin(vllm)
    assert launch.choose_road("auto", model, vllm) == "plugin"
    exported = launch.servable_dir(model, tmp_path / "cache")
    assert launch.choose_road("auto", exported, vllm) == "export"
    with pytest.raises(launch.ConfigError, match="--vllm-road export"):
        launch.choose_road("plugin", exported, vllm)
