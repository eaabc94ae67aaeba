"""How a client labels the backend of what it measured."""

from __future__ import annotations

from common import backend


def test_auto_is_what_this_process_sees_and_a_named_backend_is_kept(monkeypatch) -> None:
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.label("auto") == "host"
    # a load generator without CUDA still labels the GPU mesh it drove
    assert backend.label("cuda") == "cuda" and backend.label("host") == "host"
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    assert backend.label("auto") == "cuda"
