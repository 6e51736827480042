"""Network stand-ins for the loader tests: no test may reach the internet."""

from __future__ import annotations

import io
import urllib.error
import urllib.request

import pytest


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every URL fails at once, as on a machine without network (torchvision downloads via urlopen)."""

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)


class _Response(io.BytesIO):
    """What torchvision's download reads from urlopen: the body, its length and the final URL."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(body)
        self.url = url
        self.length = len(body)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    """``serve(body)``: every URL answers with ``body``; returns the list of URLs requested."""

    def install(body: bytes) -> list[str]:
        requested: list[str] = []

        def urlopen(request, *args, **kwargs):
            url = request.full_url if isinstance(request, urllib.request.Request) else request
            requested.append(url)
            return _Response(url, body)

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        return requested

    return install
