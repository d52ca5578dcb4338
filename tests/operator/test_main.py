"""The operator's entry point keeps kopf alive through what an apiserver restart looks like."""

from __future__ import annotations

import asyncio

import pytest
from kopf._cogs.clients import errors, watching
from kopf._cogs.configs.configuration import OperatorSettings
from kopf._cogs.structs.references import Resource

from ifw.operator import main

RESOURCE = Resource("ifw.dev", "v1alpha1", "transcriptionjobs")


def _stream_that_404s_once():
    calls = []

    async def continuous_watch(**kwargs):
        calls.append(kwargs["resource"])
        if len(calls) == 1:  # just restarted: the CRD's routes are not there yet
            raise errors.APINotFoundError("404 page not found", status=404, headers={})
        yield {"type": "ADDED", "object": {"metadata": {"name": "after"}}}

    return continuous_watch, calls


def _watch(iterations: int) -> list:
    settings = OperatorSettings()
    settings.watching.reconnect_backoff = 0

    async def collect():
        return [e async for e in watching.infinite_watch(settings=settings, resource=RESOURCE, namespace=None,
                                                         _iterations=iterations)]  # fmt: skip

    return asyncio.run(collect())


def test_kopf_alone_ends_its_watch_on_a_404(monkeypatch):
    fake, _ = _stream_that_404s_once()
    monkeypatch.setattr(watching, "continuous_watch", fake)
    with pytest.raises(errors.APINotFoundError):
        _watch(iterations=2)


def test_a_404_on_a_watch_is_watched_through(monkeypatch):
    fake, calls = _stream_that_404s_once()
    monkeypatch.setattr(watching, "continuous_watch", fake)
    monkeypatch.setattr(main, "MISSING_RESOURCE_RETRY_SECONDS", 0.0)
    main.watch_through_missing_resources()
    main.watch_through_missing_resources()  # once only, however often main starts kopf
    assert watching.continuous_watch.__wrapped__ is fake
    events = _watch(iterations=2)
    assert events == [{"type": "ADDED", "object": {"metadata": {"name": "after"}}}] and calls == [RESOURCE, RESOURCE]
