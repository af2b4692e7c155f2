"""The package root: its public API, Auto registration on import, model dirs of earlier versions, a fast CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LEGACY = Path(__file__).parent / "fixtures" / "legacy_model_dir"


def _run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_root_exposes_the_public_api():
    import convllava_jp

    for name in ("ConvLlavaConfig", "ConvLlavaForConditionalGeneration", "ConvLlavaProcessor", "VLMPipeline"):
        assert getattr(convllava_jp, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        convllava_jp.nope  # noqa: B018


def test_import_alone_lets_auto_classes_load_a_model_dir_of_an_earlier_version(tmp_path):
    """A model dir written before the package layout changed loads by `import convllava_jp` alone
    (a fresh interpreter) and gives the logits it gave then."""
    code = f"""
import json, sys
import torch
import convllava_jp
from transformers import AutoModelForImageTextToText, AutoProcessor
d = {str(LEGACY)!r}
model = AutoModelForImageTextToText.from_pretrained(d + "/model").eval()
processor = AutoProcessor.from_pretrained(d + "/model")
enc = processor(text="<image>\\n図形はいくつありますか？", images=[d + "/image.png"], return_tensors="pt")
with torch.no_grad():
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=enc["pixel_values"]).logits[0]
ids = enc["input_ids"][0]
img = model.config.image_token_id
cols = torch.arange(logits.shape[-1]) != img  # the placeholder's column: masked by that version's forward
print(json.dumps({{"model": type(model).__name__, "processor": type(processor).__name__,
                  "input_ids": ids.tolist(), "last_logits": logits[-1][cols].tolist(),
                  "text_logit_sum": float(logits[ids != img][:, cols].sum())}}))
"""
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected = json.loads((LEGACY / "expected.json").read_text(encoding="utf-8"))
    assert got["model"] == "ConvLlavaForConditionalGeneration"
    assert got["processor"] == "ConvLlavaProcessor"
    assert got["input_ids"] == expected["input_ids"]
    assert got["last_logits"] == pytest.approx(expected["last_logits"], abs=1e-4)
    assert got["text_logit_sum"] == pytest.approx(expected["text_logit_sum"], abs=1e-2)


def test_the_command_help_imports_no_torch(tmp_path):
    """As the console script starts: argv[0] is the command, then `--help` of the command and a subcommand."""
    code = """
import json, sys
sys.argv[0] = "/usr/local/bin/convllava-jp"
from convllava_jp import cli
for argv in (["--help"], ["train", "--help"], ["serve", "--help"]):
    try:
        cli.main(argv)
    except SystemExit as stop:
        assert stop.code == 0, (argv, stop.code)
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}), file=sys.stderr)
"""
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "convllava-jp" in result.stdout
    imported = json.loads(result.stderr.strip().splitlines()[-1])
    assert imported == {"torch": False, "transformers": False}


def test_the_installed_console_script_answers_help(tmp_path):
    script = shutil.which("convllava-jp", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the convllava-jp script is not installed beside this interpreter")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("info", "init", "train", "demo", "chat", "predict", "serve", "webui", "eval"):
        assert command in result.stdout


def test_python_dash_m_cli_help_imports_no_torch(tmp_path):
    """`python -m convllava_jp.cli --help` (how torchrun and the docs start it) is as light as the script."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "convllava_jp.cli", "--help"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "convllava_jp.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers")}
