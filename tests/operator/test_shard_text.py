"""A streaming sharded job's text: the shards' texts in order, only ever growing at its end (pure)."""

from __future__ import annotations

from ifw.crds.transcriptionjob import MAX_PROGRESS_TEXT
from ifw.operator.sharding import progress_patch, streamed_text
from ifw.runner.shard import text_fields


def _tj(items: dict[str, dict], *, stream: bool = True, shown: str | None = None) -> dict:
    annotations = {"ifw.dev/stream": "true"} if stream else {}
    progress = {"text": shown} if shown is not None else {}
    return {"metadata": {"annotations": annotations},
            "status": {"audio": {"durationSeconds": 300.0}, "progress": progress, "shards": {"items": items}}}  # fmt: skip


def _item(state: str, text: str | None, cut: bool = False) -> dict:
    item = {"state": state, "processedSeconds": 10.0, "totalSeconds": 100.0, "textCut": cut}
    if text is not None:
        item["text"] = text
    return item


def test_a_shard_shows_only_after_every_shard_before_it_finished():
    assert streamed_text(_tj({"1": _item("Succeeded", " b.")}), 3) == ""
    assert streamed_text(_tj({"0": _item("Running", " a"), "1": _item("Succeeded", " b.")}), 3) == " a"
    done = {"0": _item("Succeeded", " a."), "1": _item("Running", " b"), "2": _item("Succeeded", " c.")}
    assert streamed_text(_tj(done), 3) == " a. b"
    done["1"] = _item("Succeeded", " b.")
    assert streamed_text(_tj(done), 3) == " a. b. c."


def test_unused_shards_add_nothing_and_a_cut_or_missing_text_holds_back_the_rest():
    assert streamed_text(_tj({"0": _item("Succeeded", " a."), "1": _item("Unused", None)}), 2) == " a."
    cut = {"0": _item("Succeeded", " a", cut=True), "1": _item("Succeeded", " b.")}
    assert streamed_text(_tj(cut), 2) == " a"
    # A finished shard that wrote no text (a runner from before streaming shards): nothing after it.
    assert streamed_text(_tj({"0": _item("Succeeded", None), "1": _item("Succeeded", " b.")}), 2) == ""
    failed = {"0": _item("Failed", " a"), "1": _item("Succeeded", " b.")}  # its retry starts over
    assert streamed_text(_tj(failed), 2) == " a"


def test_the_text_is_capped_like_a_runners():
    long = "x" * (MAX_PROGRESS_TEXT - 10)
    items = {"0": _item("Succeeded", long), "1": _item("Succeeded", " and more than fits.")}
    assert streamed_text(_tj(items), 2) == (long + " and more than fits.")[:MAX_PROGRESS_TEXT]


def test_progress_writes_the_text_only_where_it_grows_at_its_end():
    items = {"0": _item("Succeeded", " a."), "1": _item("Running", " b")}
    assert progress_patch(_tj(items), 2)["text"] == " a. b"
    # Already shown: only the numbers may change.
    assert progress_patch(_tj(items, shown=" a. b"), 2) is not None
    assert "text" not in progress_patch(_tj(items, shown=" a. b"), 2)
    # A retried shard 1 starts over: shorter is not written (a delta is never taken back) ...
    items["1"] = _item("Running", "")
    assert "text" not in progress_patch(_tj(items, shown=" a. b"), 2)
    # ... nor is a text that does not continue what was shown.
    items["1"] = _item("Running", " c c")
    assert "text" not in progress_patch(_tj(items, shown=" a. b"), 2)
    # Not a streaming job: no text at all.
    assert "text" not in progress_patch(_tj({"0": _item("Running", " a")}, stream=False), 1)


def test_a_shard_writes_its_share_of_the_size_cap_and_says_when_it_cut():
    assert text_fields(" short", 4) == {"text": " short", "textCut": False}
    share = MAX_PROGRESS_TEXT // 4
    long = "y" * (share + 1)
    assert text_fields(long, 4) == {"text": long[:share], "textCut": True}
    assert text_fields(long, 1) == {"text": long, "textCut": False}
