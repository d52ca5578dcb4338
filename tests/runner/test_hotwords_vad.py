"""Hotwords and VAD settings on real human speech (../shared/speech/harvard), in-process and through the CLI.

Hotwords: the packaged multilingual base model hears Harvard's "Tear a thin sheet from the yellow
pad." as "Tarathin Sheet from the Yellow Pad."; with the hotword "tear" (placed before the prompt,
as faster-whisper does) it writes the sentence exactly. The sentences hold no rare words, so the
word the model mishears stands in for one.

VAD: Silero's settings (spec.vad / OpenAI's server_vad) decide where the pieces start, end and
how their speech regions are split; on the real two-speaker conversation each setting moves them.
"""

from __future__ import annotations

import json

import pytest

from ifw.crds.transcriptionjob import VAD_DEFAULT_PREFIX_PADDING_MS
from ifw.runner import asr, decoding, models, vad
from ifw.runner.config import RunnerSettings
from tests.runner.conftest import read_wav
from tests.runner.test_cli import cli

SENTENCE = "spk2_snt3.wav"  # "Tear a thin sheet from the yellow pad."


def model(name: str) -> models.WhisperModel:
    return models.load_model(name, RunnerSettings(default_model=name, device="cpu", cpu_threads=2))


def sentence(harvard, name: str):
    return next(s for s in harvard if s.path.name == name)


def words(text: str) -> list[str]:
    return [w.strip(".,?!").lower() for w in text.split()]


# ------------------------------------------------------------------ hotwords


@pytest.mark.model
def test_prompt_ids_put_the_hotwords_first_and_keep_them_whole_within_the_budget():
    whisper = model("tiny.en")
    tok = whisper.processor.tokenizer
    sop = tok.convert_tokens_to_ids("<|startofprev|>")
    hot = decoding.join_hotwords([" Ebenezer ", "", "Duguid"])
    assert hot == "Ebenezer, Duguid"
    hot_ids = tok(" " + hot, add_special_tokens=False).input_ids
    short = decoding.prompt_ids(whisper, "A meeting.", hot)
    assert short == [sop, *hot_ids, *tok(" A meeting.", add_special_tokens=False).input_ids]
    # a prompt over the budget: the hotwords stay whole, the prompt keeps its end (as OpenAI's initial_prompt)
    long_prompt = " ".join(f"word{i}" for i in range(400))
    ids = decoding.prompt_ids(whisper, long_prompt, hot)
    assert len(ids) == 1 + decoding.MAX_PROMPT_TOKENS
    assert ids[: 1 + len(hot_ids)] == [sop, *hot_ids]
    assert tok.decode(ids[-3:]).endswith("word399")
    # hotwords alone, and nothing at all
    assert decoding.prompt_ids(whisper, None, hot) == [sop, *hot_ids]
    assert decoding.prompt_ids(whisper, " ", None) is None
    with pytest.raises(Exception, match="spec.hotwords"):
        decoding.prompt_ids(whisper, None, "<|en|>")


@pytest.mark.model
def test_a_hotword_fixes_a_word_the_model_mishears_on_real_speech(harvard):
    whisper = model("base")
    s = sentence(harvard, SENTENCE)
    audio = read_wav(s.path)
    plain = asr.transcribe(audio, whisper, language="en")
    assert "tear" not in words(plain.text), plain.text  # measured: " Tarathin Sheet from the Yellow Pad."
    hot = asr.transcribe(audio, whisper, language="en", hotwords=["tear"])
    assert words(hot.text) == words(s.text), hot.text
    # combinable with a prompt (style, context): the hotword still holds
    both = asr.transcribe(audio, whisper, language="en", hotwords=["tear"], prompt="Office supplies.")
    assert words(both.text)[:3] == ["tear", "a", "thin"], both.text


@pytest.mark.model
def test_hotwords_reach_every_piece_with_the_prompt(conversation):
    whisper = model("tiny.en")
    seen: list[decoding.PieceRequest] = []

    def decode(requests, on_done):
        seen.extend(requests)
        return decoding.decode_pieces(whisper, requests, batch_size=8, on_done=on_done)

    audio = conversation.audio()[: 13 * 16000]  # the first four sentences
    pieces = vad.split_audio(audio, 5.0)  # one piece per sentence or two
    asr.transcribe(audio, whisper, pieces=pieces, hotwords=["pad", "tear"], prompt="Two people.", decode=decode)
    assert len(seen) >= len(pieces) >= 3
    assert {(r.hotwords, r.prompt) for r in seen} == {("pad, tear", "Two people.")}


# ------------------------------------------------------------------ VAD settings


def test_vad_settings_change_the_pieces_of_real_speech(conversation):
    audio = conversation.audio()
    default = vad.split_audio(audio)
    assert default == vad.split_audio(audio, options=vad.VadOptions())
    first = conversation.utterances[0].start  # where the first sentence's speech starts (measured on its samples)

    # prefix padding: each piece starts that much before its speech
    tight = vad.split_audio(audio, options=vad.VadOptions(prefix_padding_ms=0))
    assert default[0].start == pytest.approx(first - VAD_DEFAULT_PREFIX_PADDING_MS / 1000, abs=0.1)
    assert tight[0].start == pytest.approx(first, abs=0.1)
    # (the last piece ends with the file either way)
    assert all(t.start > d.start + 0.1 and t.end <= d.end for t, d in zip(tight, default, strict=True))
    assert tight[0].end < default[0].end - 0.1

    # minimum silence: pauses shorter than it (the conversation's are 0.6-1.5 s) stay inside a stretch of speech
    regions = sum(len(p.regions) for p in default)
    joined = vad.split_audio(audio, options=vad.VadOptions(silence_duration_ms=1300))
    assert (
        sum(len(p.regions) for p in joined)
        < regions
        <= sum(len(p.regions) for p in vad.split_audio(audio, options=vad.VadOptions(silence_duration_ms=100)))
    )
    # and where short pieces are cut: with 10 s pieces the cut points move
    cuts = [(round(p.start, 2), round(p.end, 2)) for p in vad.split_audio(audio, 10.0)]
    fast = [(round(p.start, 2), round(p.end, 2))
            for p in vad.split_audio(audio, 10.0, options=vad.VadOptions(silence_duration_ms=100))]  # fmt: skip
    assert fast != cuts and all(b - a <= 10.0 + 1e-6 for a, b in fast)

    # threshold: a lower one hears more as speech (the pieces grow), a higher one less
    low = vad.split_audio(audio, options=vad.VadOptions(threshold=0.05))
    assert low[0].start < default[0].start and low[0].end > default[0].end


# ------------------------------------------------------------------ the CLI


@pytest.mark.model
def test_cli_takes_hotwords_and_vad_settings(harvard, conversation, wer):
    s = sentence(harvard, SENTENCE)
    p = cli("transcribe", str(s.path), "--model", "base", "--language", "en", "--hotwords", "tear", "pad",
            "--timestamp", "word", "--format", "verbose_json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert words(out["text"]) == words(s.text), out["text"]
    # the computed figures come back: each segment's language, each word's probability
    assert {seg["language"] for seg in out["segments"]} == {"english"}
    assert len(out["words"]) == 8 and all(0 < w["probability"] <= 1 for w in out["words"])

    p = cli("transcribe", str(conversation.path), "--model", "tiny.en", "--vad-prefix-padding-ms", "0",
            "--vad-silence-duration-ms", "300", "--vad-threshold", "0.5", "--format", "verbose_json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    # the first piece starts where the speech does, not 0.2 s before (the default padding)
    assert out["segments"][0]["start"] == pytest.approx(conversation.utterances[0].start, abs=0.1)
    assert wer(conversation.text, out["text"]) <= 0.1


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--vad-threshold", "1.5"], "vad.threshold"),
        (["--vad-prefix-padding-ms", "-1"], "vad.prefixPaddingMs"),
        (["--vad-silence-duration-ms", "60000"], "vad.silenceDurationMs"),
        (["--hotwords", "x" * 101], "hotwords.0"),
        (["--hotwords", "<|en|>"], "hotwords"),
    ],
)
def test_cli_refuses_bad_values_naming_the_field(harvard, args, field):
    p = cli("transcribe", str(sentence(harvard, SENTENCE).path), "--model", "tiny.en", *args, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert f"error: {field}" in p.stderr, p.stderr
