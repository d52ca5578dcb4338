#!/usr/bin/env bash
# Make pyannote.audio importable beside the CPU build of torch.
#
#   .ci/fix-torchaudio.sh <venv>
#
# pip resolves pyannote.audio==4.0.7 to torchaudio 2.11 and torchcodec 0.17,
# which on PyPI are CUDA builds: their compiled extensions need libc10_cuda.so
# and fail to load beside torch 2.13.0+cpu. This script:
#   1. installs torchcodec==0.13.0 (--no-deps), a CPU build that loads with
#      Debian 12's ffmpeg 5.1 libraries (pyannote decodes files with it; the
#      runner itself passes audio in memory);
#   2. deletes torchaudio's compiled extensions (torchaudio/lib/*.so).
#      torchaudio then imports as pure Python (its loader treats missing
#      libraries as "not built"), and what pyannote uses from it (kaldi fbank,
#      resample, MFCC) is pure torch.
#   3. checks that torchaudio, torchcodec and pyannote.audio import and that
#      kaldi fbank runs; exits non-zero otherwise.
# Idempotent. Does nothing when torch is a CUDA build (the GPU image installs
# matching CUDA wheels and needs no fix).
set -euo pipefail

venv=${1:?usage: $0 <venv>}
py="$venv/bin/python"
[[ -x $py ]] || { echo "fix-torchaudio: no python at $py" >&2; exit 1; }
export PYANNOTE_METRICS_ENABLED=0

cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")')
if [[ -n $cuda ]]; then
    echo "fix-torchaudio: torch is a CUDA $cuda build; nothing to do"
    exit 0
fi

# 1. torchcodec: the CPU build that matches Debian's ffmpeg.
want_codec=0.13.0
have_codec=$("$py" -c 'import importlib.metadata as m; print(m.version("torchcodec"))' 2>/dev/null || true)
if [[ $have_codec != "$want_codec" ]]; then
    echo "fix-torchaudio: torchcodec ${have_codec:-absent} -> $want_codec"
    "$py" -m pip install --quiet --no-deps "torchcodec==$want_codec"
fi

# 2. torchaudio: drop the CUDA-linked extensions (found without importing it).
libdir=$("$py" - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchaudio")
if spec is None or not spec.submodule_search_locations:
    raise SystemExit("fix-torchaudio: torchaudio is not installed in this venv")
print(pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib")
EOF
)
shopt -s nullglob
libs=("$libdir"/*.so)
if (( ${#libs[@]} )); then
    echo "fix-torchaudio: removing ${#libs[@]} CUDA-linked torchaudio extension(s) from $libdir"
    rm -f -- "${libs[@]}"
fi

# 3. Prove it works.
"$py" - <<'EOF'
import torch
import torchaudio
import torchaudio.compliance.kaldi as kaldi
import torchcodec.decoders  # loads its ffmpeg-linked core library
import pyannote.audio

feats = kaldi.fbank(torch.randn(1, 16000) * 0.1, num_mel_bins=80, sample_frequency=16000, dither=0.0)
assert feats.shape == (98, 80), feats.shape
resampled = torchaudio.functional.resample(torch.randn(1, 8000), 8000, 16000)
assert resampled.shape == (1, 16000), resampled.shape
print(f"fix-torchaudio: ok (torch {torch.__version__}, torchaudio {torchaudio.__version__}, "
      f"torchcodec {torchcodec.__version__}, pyannote.audio {pyannote.audio.__version__})")
EOF
