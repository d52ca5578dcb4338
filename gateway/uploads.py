"""Uploaded audio, kept on the gateway's volume and served to the runner that transcribes it.

An upload is first staged under a random name; once its TranscriptionJob
exists it moves to <upload_dir>/<namespace>/<name>/ beside a random token of
its own and the TranscriptionJob's uid. The runner fetches it from
<internal_url>/internal/uploads/<namespace>/<name>/<token> (token compared in
constant time). The files go when the watch sees the TranscriptionJob finish
or vanish, and a sweep after start-up removes what a previous process left behind.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio

from ifw.core.contract import is_terminal
from ifw.core.redact import UPLOADS_PATH
from ifw.gateway import metrics
from ifw.gateway.errors import UploadTooLarge
from ifw.gateway.taskids import DNS1123_LABEL

log = logging.getLogger("ifw.gateway.uploads")

AUDIO = "audio"
TOKEN = "token"
UID = "uid"
CHUNK = 1024 * 1024
REFERENCE = "reference-"
MAX_REFERENCES = 16


@dataclass
class Staged:
    dir: Path
    token: str
    size: int
    filename: str
    # Known speakers' inline reference clips, kept beside the audio: each served with its own token.
    references: list[str] = field(default_factory=list)


class Uploads:
    def __init__(self, root: Path, internal_url: str | None):
        self.root = root
        self.internal_url = internal_url

    @property
    def enabled(self) -> bool:
        return bool(self.internal_url)

    # ------------------------------------------------------------ staging

    async def stage(self, source: BinaryIO, filename: str, limit: int) -> Staged:
        return await anyio.to_thread.run_sync(self._stage, source, filename, limit)

    def _stage(self, source: BinaryIO, filename: str, limit: int) -> Staged:
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        folder = staging / secrets.token_hex(16)
        folder.mkdir(mode=0o700)
        size = 0
        try:
            with open(folder / AUDIO, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(limit)
                    out.write(chunk)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        metrics.UPLOAD_BYTES.inc(size)
        return Staged(folder, secrets.token_urlsafe(32), size, filename)

    def url_for(self, namespace: str, name: str, staged: Staged, token: str | None = None) -> str:
        """The runner's URL of the upload (or, with `token`, of one of its reference clips)."""
        assert self.internal_url
        return f"{self.internal_url}{UPLOADS_PATH}{namespace}/{name}/{token or staged.token}"  # the shape redact() knows

    async def stage_reference(self, staged: Staged | None, data: bytes) -> Staged:
        """Keep a known speaker's reference clip (already decoded and bounded) with the task's upload;
        a task whose audio is a URL gets a folder of its own (no audio file in it)."""
        return await anyio.to_thread.run_sync(self._stage_reference, staged, data)

    def _stage_reference(self, staged: Staged | None, data: bytes) -> Staged:
        if staged is None:
            staging = self.root / ".staging"
            staging.mkdir(parents=True, exist_ok=True)
            folder = staging / secrets.token_hex(16)
            folder.mkdir(mode=0o700)
            staged = Staged(folder, secrets.token_urlsafe(32), 0, "")
        i = len(staged.references)
        token = secrets.token_urlsafe(32)
        (staged.dir / f"{REFERENCE}{i}").write_bytes(data)
        (staged.dir / f"{REFERENCE}{i}.{TOKEN}").write_text(token)
        staged.references.append(token)
        metrics.UPLOAD_BYTES.inc(len(data))
        return staged

    def commit(self, staged: Staged, namespace: str, name: str, uid: str) -> None:
        """The TranscriptionJob exists: move the upload where the serving route finds it."""
        (staged.dir / TOKEN).write_text(staged.token)
        (staged.dir / UID).write_text(uid)
        target = self.root / namespace / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by an earlier TranscriptionJob of the same name, gone now
            shutil.rmtree(target, ignore_errors=True)
        staged.dir.rename(target)

    def discard(self, staged: Staged) -> None:
        shutil.rmtree(staged.dir, ignore_errors=True)

    # ------------------------------------------------------------ serving

    def find(self, namespace: str, name: str, token: str) -> Path | None:
        if not (DNS1123_LABEL.match(namespace) and DNS1123_LABEL.match(name)):
            return None
        folder = self.root / namespace / name
        try:
            expected = (folder / TOKEN).read_text()
        except OSError:
            return None
        if hmac.compare_digest(expected.encode(), token.encode()):
            return folder / AUDIO
        for i in range(MAX_REFERENCES):  # a known speaker's reference clip: its own token
            try:
                expected = (folder / f"{REFERENCE}{i}.{TOKEN}").read_text()
            except OSError:
                return None
            if hmac.compare_digest(expected.encode(), token.encode()):
                return folder / f"{REFERENCE}{i}"
        return None

    # ------------------------------------------------------------ cleanup

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        """Watch listener: drop the upload once its TranscriptionJob finished or was deleted."""
        if kind != "DELETED" and not is_terminal(obj):
            return
        meta = obj["metadata"]
        self._remove(meta["namespace"], meta["name"], meta.get("uid"))

    def _remove(self, namespace: str, name: str, uid: str | None) -> None:
        folder = self.root / namespace / name
        try:
            owner = (folder / UID).read_text()
        except OSError:
            return
        if uid is None or owner == uid:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed upload of %s/%s", namespace, name, extra={"task_id": name})

    def sweep(self, live: dict[tuple[str, str], dict[str, Any]], stale_after: float = 3600) -> None:
        """After the first list: remove uploads whose TranscriptionJob is gone or finished, and old staging."""
        if not self.root.exists():
            return
        for ns_dir in self.root.iterdir():
            if ns_dir.name == ".staging":
                for folder in ns_dir.iterdir():
                    if time.time() - folder.stat().st_mtime > stale_after:
                        shutil.rmtree(folder, ignore_errors=True)
                continue
            for folder in ns_dir.iterdir():
                tj = live.get((ns_dir.name, folder.name))
                if tj is None or is_terminal(tj):
                    shutil.rmtree(folder, ignore_errors=True)
