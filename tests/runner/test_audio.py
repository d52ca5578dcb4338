"""Audio in: fetch from a loopback server (allowlisted for the test), decode real espeak speech.

Each input failure must come out as its reason and exit code (2 = bad input,
never retried; 1 = transient, retried).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from ifw.runner import audio as audio_module
from ifw.runner import errors
from ifw.runner.audio import SAMPLE_RATE, DecodeReport, decode_audio, fetch_audio, load_audio
from ifw.runner.config import RunnerSettings

SENTENCE = "The quick brown fox jumps over the lazy dog."


class _Handler(BaseHTTPRequestHandler):
    """Routes: /file/<name>, /status/<code>, /redirect/<n>, /to/<host:port/path>, and misbehaving ones."""

    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        parts = self.path.strip("/").split("/", 1)
        route, arg = parts[0], (parts[1] if len(parts) > 1 else "")
        if route == "file" and arg in self.files:
            return self._send(200, self.files[arg])
        if route == "status":
            return self._send(int(arg), b"nope")
        if route == "redirect":  # a chain of n redirects ending at the speech file
            n = int(arg)
            return self._redirect(f"/redirect/{n - 1}" if n > 0 else "/file/speech.wav")
        if route == "to":
            return self._redirect("http://" + arg)
        if route == "goto":  # any Location at all
            return self._redirect(arg)
        if route == "big-declared":  # claims 1 GB; must be refused from the header alone
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            return
        if route == "big-undeclared":  # no Content-Length: the running count must stop it
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 1024)
            return
        if route == "slow":
            time.sleep(2.0)
            return self._send(200, b"late")
        if route == "short":  # promises more than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            return
        self._send(404, b"not found")

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def clip(speech):
    return speech([("en-us", SENTENCE, 0.0)], lead_s=0.5, name="audio-test")


@pytest.fixture(autouse=True)
def _serve_clip(clip):
    _Handler.files["speech.wav"] = clip.path.read_bytes()
    _Handler.hits.clear()


@pytest.fixture
def settings(tmp_path) -> RunnerSettings:
    return RunnerSettings(
        fetch_allowlist=["127.0.0.1/32"],
        fetch_connect_timeout=2,
        fetch_read_timeout=0.5,
        fetch_max_redirects=3,
        work_dir=tmp_path,
    )


def _encode(src: Path, dest: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *args, str(dest)], check=True)
    return dest


# ---------------------------------------------------------------- fetch


def test_fetch_streams_the_file_to_disk(server, settings, tmp_path, clip):
    path = fetch_audio(f"{server}/file/speech.wav", settings, tmp_path / "dl")
    assert path.read_bytes() == clip.path.read_bytes()
    assert not list((tmp_path / "dl").glob("*.part"))


def test_fetch_follows_redirects_up_to_the_limit(server, settings, tmp_path, clip):
    # /redirect/n answers n + 1 redirects; the limit is 3.
    path = fetch_audio(f"{server}/redirect/2", settings, tmp_path)
    assert path.read_bytes() == clip.path.read_bytes()
    _Handler.hits.clear()
    with pytest.raises(errors.AudioFetchFailed, match="too many redirects") as info:
        fetch_audio(f"{server}/redirect/3", settings, tmp_path)
    assert info.value.exit_code == errors.EXIT_BAD_INPUT
    assert _Handler.hits == ["/redirect/3", "/redirect/2", "/redirect/1", "/redirect/0"]  # the 5th never asked


def test_404_is_bad_input(server, settings, tmp_path):
    with pytest.raises(errors.AudioFetchFailed, match="HTTP 404") as info:
        fetch_audio(f"{server}/status/404", settings, tmp_path)
    assert info.value.reason == "AudioFetchFailed" and info.value.exit_code == 2


@pytest.mark.parametrize("code", [500, 503, 429])
def test_5xx_is_transient(server, settings, tmp_path, code):
    with pytest.raises(errors.AudioFetchUnavailable, match=f"HTTP {code}") as info:
        fetch_audio(f"{server}/status/{code}", settings, tmp_path)
    assert info.value.reason == "AudioFetchFailed" and info.value.exit_code == errors.EXIT_TRANSIENT


def test_oversize_refused_from_content_length(server, settings, tmp_path):
    settings.max_audio_bytes = 10_000
    with pytest.raises(errors.AudioTooLarge, match="Content-Length") as info:
        fetch_audio(f"{server}/big-declared", settings, tmp_path)
    assert info.value.exit_code == 2
    assert not list(tmp_path.iterdir())


def test_oversize_refused_without_content_length(server, settings, tmp_path):
    settings.max_audio_bytes = 10_000
    with pytest.raises(errors.AudioTooLarge, match="sent more than") as info:
        fetch_audio(f"{server}/big-undeclared", settings, tmp_path)
    assert info.value.exit_code == 2
    assert not list(tmp_path.iterdir())  # the partial download is removed


def test_timeout_is_transient(server, settings, tmp_path):
    started = time.monotonic()
    with pytest.raises(errors.AudioFetchUnavailable, match="timed out") as info:
        fetch_audio(f"{server}/slow", settings, tmp_path)
    assert info.value.exit_code == 1
    assert time.monotonic() - started < 1.9  # gave up at the read timeout, not when the server answered


def test_connection_dropped_mid_body_is_transient(server, settings, tmp_path):
    with pytest.raises(errors.AudioFetchUnavailable):
        fetch_audio(f"{server}/short", settings, tmp_path)


def test_unreachable_is_bad_input(settings, tmp_path):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(errors.AudioFetchFailed, match="cannot reach") as info:
        fetch_audio(f"http://127.0.0.1:{port}/a.wav", settings, tmp_path)
    assert info.value.exit_code == 2


def test_an_upload_the_gateway_cannot_serve_now_is_transient_and_its_token_stays_hidden(settings, tmp_path):
    import socket

    with socket.socket() as s:  # the gateway, restarting: nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "s3cr3t-T0ken_value"
    with pytest.raises(errors.AudioFetchUnavailable, match="will retry") as info:
        fetch_audio(f"http://127.0.0.1:{port}/internal/uploads/team-a/job-1/{token}", settings, tmp_path)
    assert info.value.exit_code == 1 and info.value.reason == "AudioFetchFailed"
    assert token not in info.value.termination_message() and "/internal/uploads/team-a/job-1/***" in info.value.message


def test_unresolvable_name_is_bad_input(settings, tmp_path):
    # A label over 63 characters cannot be resolved; no DNS query leaves the machine.
    with pytest.raises(errors.AudioFetchFailed, match="DNS lookup failed"):
        fetch_audio(f"http://{'x' * 64}.example/a.wav", settings, tmp_path)


def test_redirect_to_private_address_refused(server, settings, tmp_path):
    with pytest.raises(errors.AudioFetchFailed, match=r"refused.*10\.0\.0\.1.*private") as info:
        fetch_audio(f"{server}/to/10.0.0.1/secret.wav", settings, tmp_path)
    assert info.value.exit_code == 2
    with pytest.raises(errors.AudioFetchFailed, match="169.254.169.254"):
        fetch_audio(f"{server}/to/169.254.169.254/latest/meta-data/", settings, tmp_path)


def test_loopback_refused_without_allowlist(server, tmp_path):
    bare = RunnerSettings(fetch_allowlist=[], work_dir=tmp_path)
    for url in (f"{server}/file/speech.wav", server.replace("127.0.0.1", "localhost") + "/file/speech.wav"):
        with pytest.raises(errors.AudioFetchFailed, match="loopback"):
            fetch_audio(url, bare, tmp_path)
    assert _Handler.hits == []


def test_other_schemes_refused(server, settings, tmp_path):
    with pytest.raises(errors.AudioFetchFailed, match="must be http"):
        fetch_audio(f"{server}/goto/file:///etc/passwd", settings, tmp_path)
    with pytest.raises(errors.AudioFetchFailed, match="http"):
        load_audio("file:///etc/passwd", settings, tmp_path)
    with pytest.raises(errors.AudioFetchFailed, match="http"):
        load_audio("ftp://127.0.0.1/a.wav", settings, tmp_path)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize(
    "fmt, args",
    [
        ("wav", ()),
        ("mp3", ("-b:a", "64k")),
        ("ogg", ("-c:a", "libvorbis")),
        ("m4a", ("-c:a", "aac")),
        ("webm", ("-c:a", "libopus")),
    ],
)
def test_speech_decodes_to_the_right_duration(clip, settings, tmp_path, fmt, args):
    src = clip.path if fmt == "wav" else _encode(clip.path, tmp_path / f"speech.{fmt}", *args)
    audio = decode_audio(src, settings)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - clip.duration) < 0.08
    # The speech is where espeak put it: silent lead-in, then sound.
    utt = clip.utterances[0]
    loud = np.flatnonzero(np.abs(audio) > 0.02) / SAMPLE_RATE
    assert abs(loud[0] - utt.start) < 0.08 and abs(loud[-1] - utt.end) < 0.08
    assert audio.flags.writeable


def test_mp3_with_cover_art_decodes(clip, settings, tmp_path):
    # Music files often carry a picture as a video stream; only the audio is decoded.
    cover = tmp_path / "cover.png"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=64x64:d=1",
                    "-frames:v", "1", str(cover)], check=True)  # fmt: skip
    tagged = tmp_path / "tagged.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(clip.path), "-i", str(cover), "-map", "0",
                    "-map", "1", "-c:v", "mjpeg", "-disposition:v", "attached_pic", "-id3v2_version", "3",
                    "-metadata", "title=Fox", str(tagged)], check=True)  # fmt: skip
    assert abs(len(decode_audio(tagged, settings)) / SAMPLE_RATE - clip.duration) < 0.08


def test_stereo_44k_is_downmixed_and_resampled(clip, settings, tmp_path):
    src = _encode(clip.path, tmp_path / "stereo.flac", "-ac", "2", "-ar", "44100")
    audio = decode_audio(src, settings)
    assert abs(len(audio) / SAMPLE_RATE - clip.duration) < 0.02
    reference = clip.audio()
    n = min(len(audio), len(reference))
    assert np.corrcoef(audio[:n], reference[:n])[0, 1] > 0.95


def test_silence_decodes(speech, settings):
    audio = decode_audio(speech.silence(2.0).path, settings)
    assert len(audio) == 2 * SAMPLE_RATE and not np.any(audio)


def test_text_file_is_invalid_audio(settings, tmp_path):
    path = tmp_path / "notes.mp3"
    path.write_text("this is not audio at all\n" * 50)
    with pytest.raises(errors.InvalidAudio, match="cannot decode") as info:
        decode_audio(path, settings)
    assert info.value.exit_code == 2 and info.value.reason == "InvalidAudio"


def test_empty_file_is_invalid_audio(settings, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(errors.InvalidAudio, match="empty"):
        decode_audio(tmp_path / "empty.wav", settings)


_CUT_FORMATS = [
    ("wav", ()),
    ("flac", ()),
    ("ogg", ("-c:a", "libvorbis")),
    ("opus", ("-c:a", "libopus")),
    ("mp3", ("-b:a", "64k")),
]


@pytest.mark.parametrize("fmt, args", _CUT_FORMATS)
def test_a_file_cut_in_half_is_transcribed_as_far_as_it_goes(clip, settings, tmp_path, fmt, args):
    # One rule for every container: what is there is decoded, exactly as in the whole file.
    full = clip.path if fmt == "wav" else _encode(clip.path, tmp_path / f"full.{fmt}", *args)
    cut = tmp_path / f"cut.{fmt}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    whole, report = decode_audio(full, settings), DecodeReport()
    part = decode_audio(cut, settings, report)
    assert 0.25 * len(whole) < len(part) < 0.75 * len(whole)
    n = len(part) - SAMPLE_RATE // 10  # the last packet may be cut through
    assert np.array_equal(part[:n], whole[:n])
    assert report.cut_short  # and says so (more in test_damaged_audio.py)
    if fmt in ("wav", "flac", "mp3"):  # their headers state the whole length (RIFF, STREAMINFO, LAME's Info frame)
        assert report.stated_seconds == pytest.approx(clip.duration, abs=0.1)


def test_a_cut_wav_decodes_to_exactly_what_it_holds(clip, settings, tmp_path):
    cut = tmp_path / "cut.wav"
    cut.write_bytes(clip.path.read_bytes()[:30_000])  # the old contract refused this (InvalidAudio)
    assert len(decode_audio(cut, settings)) == (30_000 - 44) // 2  # 16-bit mono after a 44-byte header


@pytest.mark.parametrize(
    "fmt, args, keep",
    [("ogg", ("-c:a", "libvorbis"), 600), ("mp3", ("-b:a", "64k"), 200), ("m4a", ("-c:a", "aac"), None)],
)
def test_a_file_cut_before_any_audio_is_invalid_audio(clip, settings, tmp_path, fmt, args, keep):
    # Ogg's headers alone, an MP3's first 200 bytes, an MP4 without its index (moov, at the end).
    data = _encode(clip.path, tmp_path / f"full.{fmt}", *args).read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: keep or len(data) // 2])
    with pytest.raises(errors.InvalidAudio) as info:
        decode_audio(cut, settings)
    assert info.value.exit_code == 2 and str(tmp_path) not in info.value.message


def _unknown_length_wav(clip, tool: str) -> bytes:
    """A WAV as a pipe gets it: the writer cannot seek back to fill in the sizes."""
    if tool == "ffmpeg":
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(clip.path), "-f", "wav", "pipe:1"]
        return subprocess.run(cmd, capture_output=True, check=True).stdout
    raw = clip.path.read_bytes()[44:]  # sox reading raw samples from a pipe does not know the length either
    cmd = ["sox", "-V1", "-t", "raw", "-r", "16000", "-e", "signed", "-b", "16", "-c", "1", "-", "-t", "wav", "-"]
    return subprocess.run(cmd, input=raw, capture_output=True, check=True).stdout


@pytest.mark.parametrize("tool", ["ffmpeg", "sox"])
def test_a_wav_of_unknown_length_decodes_whole(clip, settings, tmp_path, tool):
    data = _unknown_length_wav(clip, tool)
    stated = int.from_bytes(data[4:8], "little")
    assert stated != len(data) - 8  # the RIFF size is a placeholder (0xFFFFFFFF, 0x7FFFF000, ...)
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(data)
    report = DecodeReport()
    audio = decode_audio(streamed, settings, report)
    assert np.array_equal(audio, decode_audio(clip.path, settings))
    assert not report.cut_short  # it states no length: nothing to fall short of
    assert len(audio) == round(clip.duration * SAMPLE_RATE)


def test_corrupt_mp3_is_invalid_audio(clip, settings, tmp_path):
    data = bytearray(_encode(clip.path, tmp_path / "ok.mp3").read_bytes())
    start = len(data) // 4
    for i in range(start, start + 2000):  # overwrite frames in the middle with garbage
        data[i] = (i * 37) % 256
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(bytes(data))
    with pytest.raises(errors.InvalidAudio, match="cannot decode"):
        decode_audio(bad, settings)


def test_video_without_audio_is_invalid_audio(settings, tmp_path):
    video = tmp_path / "silent-film.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:d=1",
         "-c:v", "mpeg4", str(video)],
        check=True,
    )  # fmt: skip
    with pytest.raises(errors.InvalidAudio, match="matches no streams"):
        decode_audio(video, settings)


def test_too_long_audio_refused(clip, settings):
    settings.max_audio_seconds = 1.0
    with pytest.raises(errors.AudioTooLarge, match="longer than the limit of 1 s"):
        decode_audio(clip.path, settings)


def test_playlist_cannot_make_ffmpeg_fetch_urls(server, settings, tmp_path):
    # An HLS playlist pointing at a URL: ffmpeg must not fetch it (it would bypass the SSRF guard).
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{server}/file/speech.wav\n#EXT-X-ENDLIST\n")
    with pytest.raises(errors.InvalidAudio):
        decode_audio(playlist, settings)
    assert _Handler.hits == []


def test_load_audio_from_url_and_from_path(server, clip, settings, tmp_path):
    from_url = load_audio(f"{server}/file/speech.wav", settings, tmp_path / "work")
    from_path = load_audio(str(clip.path), settings, tmp_path / "work")
    assert np.array_equal(from_url, from_path)
    assert not list((tmp_path / "work").iterdir())  # the download is not kept once decoded
    with pytest.raises(errors.InvalidAudio, match="does not exist"):
        load_audio(tmp_path / "missing.wav", settings, tmp_path)


# ---------------------------------------------------------------- length limit and memory

HOURS_7 = 7 * 3600


@pytest.fixture(scope="module")
def seven_hours(tmp_path_factory) -> Path:
    """7 h of silence as a ~10 MB Opus file: one minute encoded, then looped by stream copy (seconds)."""
    work = tmp_path_factory.mktemp("long")
    minute, long = work / "minute.opus", work / "silence.opus"
    ff = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
    subprocess.run([*ff, "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "60", "-c:a", "libopus",
                    "-b:a", "3k", str(minute)], check=True)  # fmt: skip
    subprocess.run(
        [*ff, "-stream_loop", str(HOURS_7 // 60 - 1), "-i", str(minute), "-c", "copy", str(long)], check=True
    )
    return long


def test_hours_over_the_limit_are_refused_before_any_sample_is_decoded(seven_hours, settings):
    assert 5 * 1024**2 < seven_hours.stat().st_size < 15 * 1024**2
    assert settings.max_audio_seconds == 6 * 3600  # the default
    report = DecodeReport()
    with pytest.raises(errors.AudioTooLarge, match="longer than the limit of 21600 s") as info:
        decode_audio(seven_hours, settings, report)
    assert info.value.reason == "AudioTooLarge" and info.value.exit_code == 2
    assert report.samples_read == 0 and report.stated_seconds == pytest.approx(HOURS_7, abs=1)


def test_the_limit_holds_while_decoding_where_the_container_cannot_tell(seven_hours, settings, monkeypatch):
    monkeypatch.setattr(audio_module, "_probe", lambda *args: False)  # as if ffprobe found no length
    settings.max_audio_seconds = 60
    report = DecodeReport()
    with pytest.raises(errors.AudioTooLarge, match="longer than the limit of 60 s"):
        decode_audio(seven_hours, settings, report)
    # stopped one pipe read past the limit, not at the end of the 7 hours
    assert 60 * SAMPLE_RATE < report.samples_read < 62 * SAMPLE_RATE


def test_refusing_seven_hours_costs_little_memory(seven_hours):
    # Measured: ~57 MB peak for the whole process (the interpreter and imports); HEAD decoded
    # 6 h to refuse it: 1.3 GB.
    code = (
        "import sys; from pathlib import Path\n"
        "from ifw.runner import audio, errors; from ifw.runner.config import RunnerSettings\n"
        "try:\n    audio.decode_audio(Path(sys.argv[1]), RunnerSettings())\n"
        "except errors.AudioTooLarge:\n    pass\n"
        "else:\n    sys.exit('not refused')\n"
        "print([l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(seven_hours)], capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) < 150 * 1024  # KiB


def test_fetched_audio_over_the_limit_says_so_without_the_work_dir(server, seven_hours, settings, tmp_path):
    _Handler.files["silence.opus"] = seven_hours.read_bytes()
    work = tmp_path / "work"
    with pytest.raises(errors.AudioTooLarge) as info:
        load_audio(f"{server}/file/silence.opus", settings, work)
    assert str(work) not in info.value.message and "input.audio" not in info.value.message
    assert not list(work.iterdir())


def test_ffmpeg_messages_name_the_input_not_the_work_dir(server, settings, tmp_path):
    _Handler.files["notes.mp3"] = b"this is not audio at all\n" * 50
    work = tmp_path / "work"
    with pytest.raises(errors.InvalidAudio, match="cannot decode the audio") as info:
        load_audio(f"{server}/file/notes.mp3", settings, work)
    message = info.value.termination_message()
    assert "the input" in message and str(tmp_path) not in message and "input.audio" not in message


class _Pipe(io.BytesIO):
    """Hands out at most 64 KiB a read, as a pipe does."""

    def readinto(self, buffer) -> int:
        return super().readinto(memoryview(buffer)[: 64 * 1024])


def test_samples_grow_in_place_and_are_trimmed():
    data = np.arange(2_500_000, dtype=np.float32)  # past the first size and two steps
    samples = audio_module._Samples(10)
    assert samples.fill(_Pipe(data.tobytes()), stop_after=10**7) is False
    out = samples.take()
    assert np.array_equal(out, data) and out.flags.owndata and out.flags.writeable
    samples = audio_module._Samples(10)
    assert samples.fill(_Pipe(data.tobytes()), stop_after=1_000_000) is True  # stops one read past the limit
    assert 1_000_000 < samples.count <= 1_000_000 + 16 * 1024


def test_audio_memory_bench_runs_quick(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "bench.audio_memory", "--quick", "--json", str(out)],
                   cwd=Path(__file__).resolve().parents[2], check=True, capture_output=True)  # fmt: skip
    figures = json.loads(out.read_text())
    assert figures["silence"]["outcome"] == figures["silence-x4"]["outcome"] == "AudioTooLarge"
    assert figures["speech"]["outcome"] == "decoded 60 s"
    assert figures["speech"]["peak_over_samples"] < 1.5  # about the samples themselves
