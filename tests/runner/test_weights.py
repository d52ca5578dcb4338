"""The packaged CTranslate2 checkpoints, converted to transformers, decode exactly like CTranslate2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ifw.runner import weights
from ifw.runner.errors import ModelLoadFailed

SENTENCES = [
    ("en-us", "The quick brown fox jumps over the lazy dog."),
    ("en-gb", "Please call Stella and ask her to bring these things with her from the store."),
    ("en+f3", "The weather is nice today, so we are going to walk to the park."),
]


@pytest.fixture(scope="module")
def clips(speech):
    return [speech([(voice, text, 0.3)], name="weights").audio() for voice, text in SENTENCES]


def _ct2_greedy(model_name: str, features: np.ndarray, prompt: list[str]) -> list[list[int]]:
    import ctranslate2

    parts, _, _ = weights.source_files(model_name)
    folder = parts[0].parent
    if len(parts) > 1:  # ctranslate2 needs one model.bin: join the parts beside the package's config
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix="ct2-"))
        (folder / "model.bin").write_bytes(b"".join(p.read_bytes() for p in parts))
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            src = weights.source_files(model_name)[1].parent / name
            (folder / name).write_bytes(src.read_bytes())
    model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=2)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    prompt_ids = [ids[t] for t in prompt]
    out = model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
        [prompt_ids] * len(features),
        beam_size=1,
        max_length=448,
    )
    return [r.sequences_ids[0] for r in out]


@pytest.mark.model
@pytest.mark.parametrize(
    "name,prompt,kwargs",
    [
        ("tiny.en", ["<|startoftranscript|>", "<|notimestamps|>"], {}),
        (
            "base",
            ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"],
            {"language": "en", "task": "transcribe"},
        ),
    ],
)
def test_converted_model_decodes_the_same_tokens_as_ctranslate2(name, prompt, kwargs, clips, wer):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path = weights.packaged_model_path(name)
    processor = WhisperProcessor.from_pretrained(path)
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    features = processor.feature_extractor(clips, sampling_rate=16000, return_tensors="np").input_features

    expected = _ct2_greedy(name, features, prompt)
    with torch.inference_mode():
        got = model.generate(torch.from_numpy(features), num_beams=1, do_sample=False, **kwargs)
    eot = processor.tokenizer.eos_token_id
    decoded = []
    for (voice, text), ct2_ids, row in zip(SENTENCES, expected, got, strict=True):
        # transformers may return prompt, end and padding tokens (all >= <|endoftext|>); CTranslate2 none.
        hf_ids = [t for t in row.tolist() if t < eot]
        assert hf_ids == ct2_ids, f"{name}: token mismatch on {text!r}"
        decoded.append(processor.tokenizer.decode(hf_ids, skip_special_tokens=True))
    assert not [d for d in decoded if "<|" in d]
    # Token identity is the point; this only shows the tokens are the spoken words.
    assert wer(" ".join(t for _, t in SENTENCES), " ".join(decoded)) <= 0.3, decoded


@pytest.mark.model
def test_checkpoint_is_complete_and_reused(tmp_path):
    from transformers import GenerationConfig, WhisperTokenizer

    first = weights.packaged_model_path("base", cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = weights.packaged_model_path("base", cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert first.name.startswith("base-") and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    gen = GenerationConfig.from_pretrained(first)
    assert gen.task == "transcribe" and gen.is_multilingual
    assert gen.lang_to_id["<|en|>"] == 50259 and gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.alignment_heads and gen.no_timestamps_token_id == 50363
    tok = WhisperTokenizer.from_pretrained(first)
    assert tok.pad_token == "<|endoftext|>"
    assert tok.all_special_ids[-1] == gen.no_timestamps_token_id  # timestamp decoding relies on it
    assert tok.decode([50258, 50259, 50359, 50363, 440], skip_special_tokens=True) == " The"


def test_unknown_packaged_name_is_a_clear_error():
    with pytest.raises(ModelLoadFailed, match="packaged: tiny.en, base"):
        weights.packaged_model_path("large-v9")


def test_reader_rejects_other_format_versions():
    with pytest.raises(ModelLoadFailed, match="format v5, expected v6"):
        weights.read_ct2_model((5).to_bytes(4, "little") + b"\x00" * 16)


@pytest.mark.model
def test_module_cli_prints_the_checkpoint_paths(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ifw.runner.weights", "tiny.en"],
        env={"IFW_MODEL_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        check=True,
    )
    path = out.stdout.strip()
    assert path.startswith(str(tmp_path / "tiny.en-")) and (tmp_path / path / "config.json").is_file()
