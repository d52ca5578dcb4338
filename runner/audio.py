"""Audio in: download (guarded, bounded) and decode once to 16 kHz mono float32.

The decoded array is shared by ASR and diarization (the original downloaded and
decoded the file twice). Every failure is a RunnerError with a reason the
operator turns into a condition:

  AudioFetchFailed (exit 2)       unreachable, DNS failure, 4xx, refused by the SSRF guard
  AudioFetchFailed (exit 1)       5xx, timeouts, connection dropped mid-body: worth a retry
  AudioTooLarge                   over settings.max_audio_bytes or settings.max_audio_seconds
  InvalidAudio                    not audio, corrupt, no audio stream
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np

from ifw.core.netguard import DestinationNotAllowed, guarded_client
from ifw.core.redact import UPLOADS_PATH, redact
from ifw.runner import errors
from ifw.runner.config import RunnerSettings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # what Whisper, Silero and pyannote all take: the one decode serves them all
USER_AGENT = "ifw-runner/0.1 (+https://ifw.dev)"
_CHUNK = 1024 * 1024


def _mib(n: float) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _redact(url: httpx.URL | str) -> str:
    """The URL without credentials, query (presigned URLs carry secrets there) or upload token."""
    u = httpx.URL(str(url))
    return redact(str(u.copy_with(userinfo=b"", query=None, fragment=None)))


def fetch_audio(url: str, settings: RunnerSettings, dest_dir: Path) -> Path:
    """Download `url` into `dest_dir`, following at most settings.fetch_max_redirects redirects.

    Redirects are followed here, one hop at a time, so that each hop's scheme is
    checked and counted; the guarded transport checks each hop's address.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    timeout = httpx.Timeout(
        connect=settings.fetch_connect_timeout,
        read=settings.fetch_read_timeout,
        write=settings.fetch_read_timeout,
        pool=settings.fetch_connect_timeout,
    )
    # identity: the size cap then applies to the bytes on the wire, and no
    # compression bomb can expand behind it.
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    current = _parse_url(url)
    with guarded_client(settings.fetch_allowlist, timeout=timeout, headers=headers) as client:
        for _hop in range(settings.fetch_max_redirects + 1):
            try:
                with client.stream("GET", current) as response:
                    if response.is_redirect:
                        current = _next_hop(response)
                        continue
                    _check_status(response)
                    return _save(response, settings.max_audio_bytes, dest_dir)
            except DestinationNotAllowed as error:
                raise errors.AudioFetchFailed(
                    f"refused to fetch {_redact(current)}: {error}; allow it in the runner's fetch allowlist "
                    "(IFW_FETCH_ALLOWLIST; Helm runner.env) if intended"
                ) from error
            except httpx.TimeoutException as error:
                raise errors.AudioFetchUnavailable(
                    f"timed out fetching {_redact(current)} ({type(error).__name__}); will retry"
                ) from error
            except httpx.ConnectError as error:
                if current.path.startswith(UPLOADS_PATH):
                    # The gateway keeping the upload is restarting (or rolling): it comes back.
                    raise errors.AudioFetchUnavailable(
                        f"cannot reach the gateway for the upload {_redact(current)}: {error}; will retry"
                    ) from error
                raise errors.AudioFetchFailed(f"cannot reach {_redact(current)}: {error}") from error
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as error:
                raise errors.AudioFetchFailed(f"cannot fetch {_redact(current)}: {error}") from error
            except httpx.TransportError as error:  # dropped mid-body, protocol errors: transient
                raise errors.AudioFetchUnavailable(f"error while fetching {_redact(current)}: {error}") from error
    raise errors.AudioFetchFailed(
        f"too many redirects (more than {settings.fetch_max_redirects}) fetching {_redact(url)}"
    )


def _parse_url(url: str | httpx.URL) -> httpx.URL:
    try:
        parsed = httpx.URL(str(url))
    except httpx.InvalidURL as error:
        raise errors.AudioFetchFailed(f"invalid audio URL: {error}") from error
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise errors.AudioFetchFailed(f"audio URL must be http(s) with a host, got {_redact(url)!r}")
    return parsed


def _next_hop(response: httpx.Response) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise errors.AudioFetchFailed(f"{_redact(response.url)} answered {response.status_code} without a Location")
    return _parse_url(response.url.join(location))


def _check_status(response: httpx.Response) -> None:
    code = response.status_code
    where = _redact(response.url)
    if code >= 500 or code in (408, 429):
        raise errors.AudioFetchUnavailable(f"{where} answered HTTP {code} {response.reason_phrase}; will retry")
    if code >= 400:
        raise errors.AudioFetchFailed(f"{where} answered HTTP {code} {response.reason_phrase}")
    if code != 200:
        raise errors.AudioFetchFailed(f"{where} answered HTTP {code}, expected 200 with the audio")


def _save(response: httpx.Response, max_bytes: int, dest_dir: Path) -> Path:
    where = _redact(response.url)
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise errors.AudioTooLarge(
            f"{where} is {_mib(int(declared))} (Content-Length), over the limit of {_mib(max_bytes)}"
        )
    target = dest_dir / "input.audio"
    partial = target.with_suffix(".part")
    received = 0
    with partial.open("wb") as out:
        for chunk in response.iter_raw(_CHUNK):
            received += len(chunk)
            if received > max_bytes:  # servers may send no Content-Length, or lie
                out.close()
                partial.unlink(missing_ok=True)
                raise errors.AudioTooLarge(f"{where} sent more than {_mib(max_bytes)}, the download limit")
            out.write(chunk)
    partial.replace(target)
    log.info("fetched %s: %d bytes", where, received)
    return target


# --------------------------------------------------------------------- decode


def _ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if not found:
        raise errors.RunnerError("ffmpeg is not installed in the runner image (apt-get install ffmpeg)")
    return found


def _reason(stderr: str) -> str:
    """ffmpeg's own words, minus the noise (addresses, repeated lines)."""
    lines = []
    for line in stderr.splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", line).strip()
        if line and "Last message repeated" not in line and line not in lines:
            lines.append(line)
    return "; ".join(lines[-4:]) or "no detail"


def decode_audio(path: Path, settings: RunnerSettings) -> np.ndarray:
    """Decode any audio (or video with audio) file to 16 kHz mono float32, in one ffmpeg pass.

    -xerror makes ffmpeg fail on decode errors instead of skipping them, so a
    truncated or damaged file is refused (InvalidAudio) rather than silently
    transcribed in part. Only the local file protocol is allowed: a playlist
    (HLS, concat) must not make ffmpeg fetch URLs behind the SSRF guard's back.
    """
    path = Path(path)
    if not path.is_file():
        raise errors.InvalidAudio(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise errors.InvalidAudio("the audio file is empty (0 bytes)")
    max_samples = int(settings.max_audio_seconds * SAMPLE_RATE)
    cmd = [
        _ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-xerror",
        "-protocol_whitelist", "file",
        "-i", str(path),
        "-map", "0:a:0", "-vn", "-sn", "-dn",
        "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-c:a", "pcm_f32le",
        # Decode one second past the limit: enough to know it is over, no more.
        "-t", f"{settings.max_audio_seconds + 1:.3f}",
        "pipe:1",
    ]  # fmt: skip
    pcm = bytearray()
    with tempfile.TemporaryFile() as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(_CHUNK):
            pcm += chunk
        code = proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0:
        raise errors.InvalidAudio(f"cannot decode the audio: {_reason(stderr)}")
    samples = np.frombuffer(pcm, dtype=np.float32)  # a writable view: bytearray is mutable
    if samples.size == 0:
        detail = f": {_reason(stderr)}" if stderr.strip() else ""
        raise errors.InvalidAudio(f"the file decoded to no audio samples{detail}")
    if samples.size > max_samples:
        raise errors.AudioTooLarge(
            f"the audio is longer than the limit of {settings.max_audio_seconds:g} s (IFW_MAX_AUDIO_SECONDS)"
        )
    return samples


def is_url(source: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source))


def load_audio(source: str | Path, settings: RunnerSettings, work_dir: Path) -> np.ndarray:
    """A URL (fetched through the guard) or a local file path, decoded once.

    The CLI and the Pod share this. Only http(s) URLs are fetched; other schemes
    (file://, ftp://, ...) are refused rather than guessed at.
    """
    text = str(source)
    if is_url(text):
        if not text.lower().startswith(("http://", "https://")):
            raise errors.AudioFetchFailed(f"unsupported URL scheme in {text.split('://')[0]!r}: use http or https")
        path = fetch_audio(text, settings, Path(work_dir))
        try:
            return decode_audio(path, settings)
        finally:
            path.unlink(missing_ok=True)  # the decoded array is all we keep
    return decode_audio(Path(text).expanduser(), settings)
