"""Every convert test runs offline: any hub download is a bug in the test."""

from __future__ import annotations

import pytest

from convllava_jp.convert import vision_trunk


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any hub access is a bug in a test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access in a test: hf_hub_download{args}")

    monkeypatch.setattr(vision_trunk, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
