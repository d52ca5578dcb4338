"""Audio in: download (guarded, bounded) and decode once to 16 kHz mono float32.

The decoded array is shared by ASR and diarization (the original downloaded and
decoded the file twice). Every failure is a RunnerError with a reason the
operator turns into a condition:

  AudioFetchFailed (exit 2)       unreachable, DNS failure, 4xx, refused by the SSRF guard
  AudioFetchFailed (exit 1)       5xx, timeouts, connection dropped mid-body: worth a retry
  AudioTooLarge                   over settings.max_audio_bytes or settings.max_audio_seconds
  InvalidAudio                    not audio, no audio stream, damaged with audio after the damage

One rule for damaged input, whatever the container (decode_audio): a file cut short is decoded as
far as it goes and the report says so (DecodeReport.cut_short, .note; the transcript and the job's
status carry it); damage with audio after it is InvalidAudio naming where, because skipping it
would move every later word earlier.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx
import numpy as np

from ifw.core.netguard import DestinationNotAllowed, guarded_client
from ifw.core.redact import UPLOADS_PATH, redact
from ifw.core.riff import wave_chunks
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

_SECOND = SAMPLE_RATE  # samples
_GROW = 60 * _SECOND  # the buffer's first size and least step when the container states no length
_TAIL = _SECOND  # audio after a decode error that still counts as "the end": a cut-off last packet
_PROBE_PACKETS = 200  # packets read where the limit falls (4 s of Opus, 5 s of MP3)
_STDERR_TAIL = 64 * 1024  # bytes of ffmpeg's stderr kept: a long damaged file logs a line per frame
# Seconds a whole file's decode may differ from the length its container states: codec delay and
# padding (measured up to 0.17 s: MP3 at 8 kHz; 0.1 s at 16 kHz; AAC, Opus, Vorbis, FLAC under 0.05 s).
# Less time than this lost to damage goes unnoticed; more is a file cut short, or a hole (InvalidAudio).
_SLACK = 0.25
_GAP = 0.1  # a jump of the container's timestamps this long is where the damage lies (InvalidAudio names it)
_WAV_PLACEHOLDER = 0x7FFF_F000  # a WAV data size this large is a pipe's "unknown" (ffmpeg 0xFFFFFFFF, sox 0x7FFFF000)
_NOTE_MAX = 1024  # characters of DecodeReport.note (the CRD's status.audio.note)


@dataclass
class DecodeReport:
    """What one decode found (pass one to decode_audio to read it)."""

    stated_seconds: float | None = None  # the length the container states; None where it states none
    stated_is_estimate: bool = False  # ffprobe guessed it from the bitrate
    samples_read: int = 0  # samples ffmpeg delivered, all passes together
    decoded_seconds: float = 0.0
    tail_error: str = ""  # ffmpeg's words where the decode stopped at an error at the very end
    channels: int | None = None  # the audio stream's channels, as ffprobe states them
    stream_start: float = 0.0  # the audio stream's first timestamp (its clock's zero), as ffprobe states it
    unfinished: bool = False  # the container shows it was cut off where it states no length (Ogg: no last page)
    start: float = 0.0  # the stretch decoded (seconds on the file's clock): a shard's range
    length: float | None = None  # None: to the end of the file

    @property
    def to_the_end(self) -> bool:
        return self.length is None

    @property
    def ends_early(self) -> bool:
        """Shorter than its container says (by more than codec delay and padding): a file cut off."""
        if self.stated_seconds is None or self.stated_is_estimate or not self.decoded_seconds:
            return False
        end = self.stated_seconds if self.length is None else min(self.stated_seconds, self.start + self.length)
        return self.start + self.decoded_seconds < end - _SLACK

    @property
    def cut_short(self) -> bool:
        """Decoded only as far as it goes: shorter than its container says, or an Ogg stream without its
        last page. An error at the very end alone is not: a WAV from a pipe ends in a partial packet, and
        where a file states no length (that WAV, an MP3 without its Info frame) a cut is not to be seen."""
        return self.ends_early or (self.unfinished and self.to_the_end)

    @property
    def note(self) -> str:
        """Why cut_short, in words ("" when it is not)."""
        if not self.cut_short:
            return ""
        end = self.start + self.decoded_seconds
        if self.ends_early:
            why = f"the audio ends at {end:.1f} s, before the {self.stated_seconds:.1f} s its container states"
        else:
            why = f"the audio ends at {end:.1f} s without the Ogg stream's last page (the file was cut off)"
        detail = f" (the decoder: {self.tail_error})" if self.tail_error else ""
        return f"{why}: transcribed as far as it goes{detail}"[:_NOTE_MAX]

    def transcript_fields(self) -> dict[str, object]:
        """What the transcript says of it (ifw.core.transcript.Transcript): nothing for audio decoded whole."""
        if not self.cut_short:
            return {}
        stated = round(self.stated_seconds, 3) if self.ends_early and self.stated_seconds is not None else None
        return {"cut_short": True, "stated_duration": stated, "audio_note": self.note}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise errors.RunnerError(f"{name} is not installed in the runner image (apt-get install ffmpeg)")
    return found


def _hide_paths(text: str, path: Path) -> str:
    """ffmpeg quotes its input by path: the user gets "the input", not the runner's work dir."""
    for form in {str(path.absolute()), str(path)}:
        text = text.replace(form, "the input")
    return text.replace(f"{path.absolute().parent}/", "")


def _reason(stderr: str, path: Path) -> str:
    """ffmpeg's own words, minus the noise (addresses, repeated lines) and the input's path."""
    lines = []
    for line in _hide_paths(stderr, path).splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", line).strip()
        if line and "Last message repeated" not in line and line not in lines:
            lines.append(line)
    return "; ".join(lines[-4:]) or "no detail"


def _float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _probe(path: Path, limit_s: float, report: DecodeReport) -> bool:
    """Fill in the length the container states; True when audio provably runs past `limit_s`.

    The stated length can lie (a WAV or FLAC cut short still states its whole length), so
    refusal rests on a packet that is there: ffprobe seeks to the limit and lists the packets
    it finds. Any failure here only means no early answer; the decode has the last word.
    """
    cmd = [
        _tool("ffprobe"), "-hide_banner", "-v", "warning", "-protocol_whitelist", "file",
        "-select_streams", "a:0", "-read_intervals", f"{limit_s:.3f}%+#{_PROBE_PACKETS}",
        "-show_entries", "stream=start_time,duration,channels:format=duration:packet=pts_time",
        "-of", "json", str(path),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        info = json.loads(done.stdout or b"{}") if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as error:
        log.debug("ffprobe gave no answer: %s", error)
        return False
    stream = (info.get("streams") or [{}])[0]
    report.stated_seconds = _float(stream.get("duration")) or _float(info.get("format", {}).get("duration"))
    report.channels = int(stream["channels"]) if str(stream.get("channels", "")).isdigit() else None
    report.stated_is_estimate = b"Estimating duration from bitrate" in done.stderr
    start = report.stream_start = _float(stream.get("start_time")) or 0.0
    packets = (_float(p.get("pts_time")) for p in info.get("packets", []))
    return any(t is not None and t - start > limit_s for t in packets)


def _wav_stated_seconds(path: Path) -> float | None:
    """The length a PCM WAV's header states (its data chunk's size); None where it states none.

    ffprobe reports the length of the bytes that are there for a WAV cut short (as an estimate), so
    a cut WAV looked whole. A WAV written to a pipe states a placeholder size: that is no length.
    """
    with path.open("rb") as f:
        head = f.read(64 * 1024)
    if head[:4] != b"RIFF":  # RF64 states its sizes elsewhere (ds64): left to ffprobe
        return None
    rate, align = 0, 0
    for tag, body, size in wave_chunks(head):
        if tag == b"fmt ":
            fmt = head[body : body + 16]
            if len(fmt) < 16 or int.from_bytes(fmt[:2], "little") not in (1, 3, 0xFFFE):  # PCM, float, extensible
                return None
            rate, align = int.from_bytes(fmt[4:8], "little"), int.from_bytes(fmt[12:14], "little")
        elif tag == b"data":
            if not rate or not align or size == 0 or size >= _WAV_PLACEHOLDER:
                return None
            return size // align / rate
    return None


def _ogg_unfinished(path: Path) -> bool:
    """An Ogg file whose last page is cut through or lacks end-of-stream (RFC 3533): cut off.

    Ogg states its length by its last page's timestamp, so a cut Ogg file states the cut length:
    only the missing end-of-stream flag tells it was cut.
    """
    with path.open("rb") as f:
        if f.read(4) != b"OggS":
            return False
        size = f.seek(0, 2)
        f.seek(max(0, size - 2 * 65_307))  # two pages at most (27 + 255 + 255 * 255 bytes each)
        tail = f.read()
    at = tail.rfind(b"OggS")
    while at >= 0:
        header = tail[at : at + 27]
        if len(header) == 27 and header[4] == 0:  # stream structure version 0
            table = tail[at + 27 : at + 27 + header[26]]
            end = at + 27 + len(table) + sum(table)
            if len(table) < header[26] or end > len(tail):
                return True  # the last page is cut through
            if end == len(tail):
                return not header[5] & 0x04  # end-of-stream flag
        at = tail.rfind(b"OggS", 0, at)
    return False


def _clock_end(path: Path, after: float, seconds: float) -> float | None:
    """Where the audio stream's packets from `after` (its clock, seconds) on end, reading `seconds` of them."""
    cmd = _packets_cmd(path, f"{max(after, 0.0):.3f}%+{seconds:.3f}")
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.debug("ffprobe gave no answer: %s", error)
        return None
    ends = [a + (b or 0.0) for a, b in map(_packet, done.stdout.decode(errors="replace").splitlines()) if a is not None]
    return max(ends) if ends else None


def _packets_cmd(path: Path, interval: str | None) -> list[str]:
    """ffprobe listing the audio stream's packets as "pts_time,duration_time" lines (no decoding),
    those of `interval` (ffprobe's -read_intervals syntax) or all."""
    return [
        _tool("ffprobe"), "-hide_banner", "-v", "quiet", "-protocol_whitelist", "file", "-select_streams", "a:0",
        *(["-read_intervals", interval] if interval else []),
        "-show_entries", "packet=pts_time,duration_time", "-of", "csv=p=0", str(path),
    ]  # fmt: skip


def _packet(line: str) -> tuple[float | None, float | None]:
    pts, _, duration = line.partition(",")
    return _float(pts), _float(duration.split(",")[0])


def _first_gap(path: Path, after: float, min_gap: float) -> tuple[float, float] | None:
    """(where, how long) on the stream's clock: the first jump of its packets' timestamps over
    `min_gap` seconds from `after` on; None where there is none. Reads packets (no decoding) and stops there."""
    cmd = _packets_cmd(path, f"{after:.3f}%" if after > 0 else None)
    end = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                pts, duration = _packet(line)
                if pts is None:  # a packet the demuxer could not place: the next one says where the clock is
                    continue
                if end is not None and pts - end > min_gap:
                    return end, pts - end
                end = pts + (duration or 0.0)
        finally:
            proc.kill()
    return None


def _check_clock(path: Path, report: DecodeReport) -> None:
    """InvalidAudio where the decode lost time before the end: damage the decoder passed over with no error.

    FLAC, Ogg and Matroska decoders drop a damaged frame, page or cluster and go on, so every later
    sample comes early. Such a file decodes to less than its container states; so does one cut
    short. The container's own clock tells them apart: the timestamps of its last packets end where
    the samples end in a file cut short, and run on past them in a file with a hole.
    """
    if not report.ends_early:
        return
    end = report.start + report.decoded_seconds  # seconds on the file's clock
    stop = None if report.length is None else report.start + report.length
    clock = _clock_end(path, report.stream_start + end - 1.0, 5.0 + 2 * _SLACK)
    if clock is None:
        return
    clock -= report.stream_start
    if stop is not None:
        clock = min(clock, stop)
    if clock <= end + _SLACK:
        return  # cut short: decoded as far as it goes
    lost = clock - end
    gap = _first_gap(path, report.stream_start + report.start, _GAP)
    where = (f"at {gap[0] - report.stream_start:.1f} s ({gap[1]:.1f} s of it lost)" if gap
             else f"before {clock:.1f} s ({lost:.1f} s of it lost)")  # fmt: skip
    raise errors.InvalidAudio(
        f"cannot decode the audio: it is damaged {where} and more audio follows (skipping the damage would shift "
        f"every later timestamp: the decoder gave {end:.1f} s where the container's timestamps run to {clock:.1f} s)"
    )


class _Samples:
    """float32 samples read straight from ffmpeg's pipe into one array.

    No bytes object of the whole stream and no copy at the end: the array grows in place
    (realloc, which Linux does by remapping pages) and is trimmed to its length once done,
    so a decode peaks at about its samples plus one step.
    """

    def __init__(self, capacity: int, channels: int = 1) -> None:
        # Multichannel: interleaved frames of `channels` samples; capacity and counts are in frames.
        self.channels = channels
        self.array = np.empty(max(capacity * channels, 1), dtype=np.float32)
        self.nbytes = 0

    def fill(self, pipe: BinaryIO, stop_after: int) -> bool:
        """Read to EOF; True, at once, if more than `stop_after` samples come."""
        stop_bytes = stop_after * 4 * self.channels
        while self.nbytes <= stop_bytes:
            if self.nbytes == self.array.nbytes:
                size = self.array.size
                # resize zero-fills what it adds: modest steps keep the unused tail small
                self.array.resize(size + max(size // 8, _GROW), refcheck=False)
            with memoryview(self.array).cast("B") as view:  # released before any resize
                n = pipe.readinto(view[self.nbytes :])
            if not n:
                return False
            self.nbytes += n
        return True

    @property
    def count(self) -> int:
        return self.nbytes // (4 * self.channels)

    def clear(self) -> None:
        self.nbytes = 0

    def take(self) -> np.ndarray:
        array = self.array
        self.release()
        if array.size > self.count:
            array.resize(self.count * self.channels, refcheck=False)  # shrinks in place: no copy
        if self.channels > 1:  # (channels, frames): a view, each channel's samples strided
            return array[: self.count * self.channels].reshape(-1, self.channels).T
        return array

    def release(self) -> None:
        self.array = np.empty(0, dtype=np.float32)


def _run_ffmpeg(
    path: Path, strict: bool, samples: _Samples, stop_after: int, report: DecodeReport,
    seek: tuple[float, float | None] = (0.0, None),
) -> tuple[int | None, str]:  # fmt: skip
    """One ffmpeg pass into `samples`: (exit code, or None if stopped past `stop_after`; stderr)."""
    cmd = [
        _tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", *(["-xerror"] if strict else []),
        "-protocol_whitelist", "file",
        *_seek_args(seek),
        "-i", str(path),
        "-map", "0:a:0", "-vn", "-sn", "-dn",
        "-ac", str(samples.channels), "-ar", str(SAMPLE_RATE), "-f", "f32le", "-c:a", "pcm_f32le",
        "-t", f"{(stop_after + _SECOND) / SAMPLE_RATE:.3f}",  # past the stop, no further
        "pipe:1",
    ]  # fmt: skip
    samples.clear()
    with tempfile.TemporaryFile() as err:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, bufsize=0) as proc:
            assert proc.stdout is not None
            stopped = True  # an exception, too, leaves ffmpeg to be stopped
            try:
                stopped = samples.fill(proc.stdout, stop_after)  # type: ignore[arg-type]
            finally:
                if stopped:
                    proc.kill()
            code = proc.wait()
        report.samples_read += samples.count
        err.seek(max(0, err.seek(0, 2) - _STDERR_TAIL))
        stderr = err.read().decode(errors="replace")
    return (None if stopped else code), stderr


def _seek_args(seek: tuple[float, float | None]) -> list[str]:
    """ffmpeg input options for a stretch of the file (a shard's range): it seeks, and decodes only that.
    Input seeking is sample-accurate when decoding: the same command always gives the same samples."""
    start, length = seek
    return [*(["-ss", f"{start:.6f}"] if start > 0 else []), *(["-t", f"{length:.6f}"] if length is not None else [])]


def decode_audio(
    path: Path, settings: RunnerSettings, report: DecodeReport | None = None, *,
    start: float = 0.0, length: float | None = None, multichannel: bool = False,
) -> np.ndarray:  # fmt: skip
    """Decode any audio (or video with audio) file to 16 kHz mono float32, as far as it goes.

    One rule for every container: a file cut short is decoded up to the cut, and ``report`` says
    so (cut_short, note: shorter than the container states, an Ogg stream without its last page,
    or stopped at an error at the very end); a WAV streamed with unknown sizes states no length and
    decodes whole, unflagged. Damage with more audio after it, or no audio at all, is InvalidAudio
    naming where (skipping damage would shift every later timestamp). A strict pass (-xerror) stops
    at the first error; only when it does, a tolerant pass says whether audio follows. Damage a
    decoder drops with no error (FLAC, Ogg, Matroska) shows as time lost: the decode ends before the
    container's stated length while the container's timestamps run on (_check_clock). The length limit is checked before any sample is held where the container
    allows, and in any case as the samples come. Only the local file protocol is allowed: a
    playlist (HLS, concat) must not make ffmpeg fetch URLs behind the SSRF guard's back.
    With ``start``/``length`` (seconds) only that stretch is decoded: a shard's range (ifw.runner.shard).
    With ``multichannel`` each channel is kept (not mixed to mono): an array (channels, samples) of a file
    with 2 to MAX_CHANNELS channels, the length limit counted over all channels together (the work and
    the memory grow with both); a mono file raises NotMultichannel.
    """
    path = Path(path)
    report = report if report is not None else DecodeReport()
    if not path.is_file():
        raise errors.InvalidAudio(f"the audio file {path.name!r} does not exist")
    if path.stat().st_size == 0:
        raise errors.InvalidAudio("the audio file is empty (0 bytes)")
    limit_s = settings.max_audio_seconds
    max_samples = int(limit_s * SAMPLE_RATE)
    if _probe(path, limit_s, report):
        raise _too_long(limit_s, report)
    wav_seconds = _wav_stated_seconds(path)
    if wav_seconds is not None:  # the header's length, not what ffprobe estimates from the bytes there
        report.stated_seconds, report.stated_is_estimate = wav_seconds, False
    report.unfinished = _ogg_unfinished(path)
    report.start, report.length = start, length
    channels = _channels(report) if multichannel else 1
    if channels > 1:
        limit_s /= channels
        max_samples = int(limit_s * SAMPLE_RATE)
    stated = report.stated_seconds
    if length is not None:  # a stretch: room for that much (and no more when the file states nothing)
        stated = min(stated or length, length)
    expected = int(min(stated, limit_s) * SAMPLE_RATE) + _SECOND if stated else _GROW
    samples = _Samples(expected, channels)
    try:
        return _decode(path, samples, max_samples, limit_s, report, (start, length))
    except errors.AudioTooLarge as error:
        if channels == 1:
            raise
        raise errors.AudioTooLarge(
            f"the audio is longer than {limit_s:g} s: with {channels} channels transcribed one by one, the limit "
            f"of {settings.max_audio_seconds:g} s (IFW_MAX_AUDIO_SECONDS) counts every channel"
        ) from error
    finally:
        samples.release()  # a failure's traceback keeps the frames alive: not the samples with them


def _decode(path: Path, samples: _Samples, max_samples: int, limit_s: float, report: DecodeReport,
            seek: tuple[float, float | None] = (0.0, None)) -> np.ndarray:  # fmt: skip
    code, stderr = _run_ffmpeg(path, True, samples, max_samples, report, seek)
    if code is None:
        raise _too_long(limit_s, report)
    if code != 0:
        failed_at = samples.count
        if failed_at == 0:
            raise errors.InvalidAudio(f"cannot decode the audio: {_reason(stderr, path)}")
        # Stopped at an error: decode again, past it, to see whether it was the end.
        code, _ = _run_ffmpeg(path, False, samples, failed_at + _TAIL, report, seek)
        if code is None:
            raise errors.InvalidAudio(
                f"cannot decode the audio: it is damaged at {seek[0] + failed_at / SAMPLE_RATE:.1f} s and more audio "
                f"follows (skipping the damage would shift every later timestamp): {_reason(stderr, path)}"
            )
        report.tail_error = _reason(stderr, path)
    if samples.count == 0:
        detail = f": {_reason(stderr, path)}" if stderr.strip() else ""
        raise errors.InvalidAudio(f"the file decoded to no audio samples{detail}")
    if samples.count > max_samples:
        raise _too_long(limit_s, report)
    report.decoded_seconds = samples.count / SAMPLE_RATE
    _check_clock(path, report)
    if report.cut_short and report.to_the_end:
        log.warning("%s", report.note)
    return samples.take()


def _channels(report: DecodeReport) -> int:
    """The channel count of a multichannel job's audio, or why it cannot be one."""
    from ifw.crds.transcriptionjob import MAX_CHANNELS

    n = report.channels
    if n is None:
        raise errors.InvalidAudio("multichannel: cannot tell how many channels the audio has (ffprobe states none)")
    if n < 2:
        raise errors.NotMultichannel(
            "multichannel was asked for but the audio has one channel (mono): send the recording with one "
            "channel per speaker, or leave multichannel off (diarization can split one channel by speaker)"
        )
    if n > MAX_CHANNELS:
        raise errors.InvalidAudio(f"multichannel: the audio has {n} channels; at most {MAX_CHANNELS} are transcribed")
    return n


def _too_long(limit_s: float, report: DecodeReport) -> errors.AudioTooLarge:
    said = report.stated_seconds
    stated = f"; its container says {said:.0f} s" if said and said > limit_s else ""
    return errors.AudioTooLarge(f"the audio is longer than the limit of {limit_s:g} s (IFW_MAX_AUDIO_SECONDS){stated}")


def is_url(source: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source))


def load_audio(source: str | Path, settings: RunnerSettings, work_dir: Path, multichannel: bool = False,
               report: DecodeReport | None = None) -> np.ndarray:  # fmt: skip
    """A URL (fetched through the guard) or a local file path, decoded once (``report``: what the decode found).

    The CLI and the Pod share this. Only http(s) URLs are fetched; other schemes
    (file://, ftp://, ...) are refused rather than guessed at.
    """
    text = str(source)
    if is_url(text):
        if not text.lower().startswith(("http://", "https://")):
            raise errors.AudioFetchFailed(f"unsupported URL scheme in {text.split('://')[0]!r}: use http or https")
        path = fetch_audio(text, settings, Path(work_dir))
        try:
            return decode_audio(path, settings, report, multichannel=multichannel)
        finally:
            path.unlink(missing_ok=True)  # the decoded array is all we keep
    return decode_audio(Path(text).expanduser(), settings, report, multichannel=multichannel)
