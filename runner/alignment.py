"""Word timestamps: the alignment heads' cross-attention over the kept decode, then DTW.

transformers' `generate(return_token_timestamps=True)` switches the model to eager attention,
keeps every step's cross-attention of every layer for every row (~1.9 MB per row per step for
large-v3), and then runs a pure-Python DTW (~0.2 s per row) for every row, sampled ones too, on
the thread that decodes. Here the same numbers come from two cheap steps:

1. `matrices` (the decoder's thread, on the device): after generate(), without token timestamps,
   ONE teacher-forced pass of the decoder over each piece's kept candidate only (its prompt and
   start tokens, then its tokens), on the encoder output already computed. Forward hooks on the
   alignment heads' layers take the cross-attention's own q_proj/k_proj outputs and compute
   softmax(q·kᵀ) for those heads alone, exactly as eager attention would. So the model keeps its
   SDPA/FlashAttention kernels and its config (no switch to eager that another thread could see),
   nothing computes or keeps the other heads' weights, and the only extra memory is the alignment
   heads' attention of the kept rows (bounded by `ROWS_PER_PASS`). The per-row math is
   transformers' `_extract_token_timestamps`: cut at the clip's real end (mel frames // 2),
   normalise each head per frame over the tokens (std without Bessel), median filter of
   `config.median_filter_width` over frames (reflect padding), mean over heads. What goes back to
   the host is one small float32 matrix per piece (tokens x frames), kept in PieceResult.alignment.
2. `token_times` (where the piece's segments are built: ifw.runner.segments, in the job's own
   thread; a pool worker's SharedDecoder hands finished pieces back to the jobs' threads): DTW on
   the negated matrix, and the jumps' frames x 0.02 s. `dtw` is a numpy anti-diagonal wavefront
   (one vectorised step per diagonal: ~6 ms for 150 x 1500 on 2 CPU cores, against ~160-230 ms)
   that follows transformers' `_dynamic_time_warping` step for step: the same float32 costs (a
   float32 sum of float32 values rounds exactly as transformers' float64 sum stored into
   float32), the same tie-breaking, and so the same path. Doing the DTW there needs no extra
   thread: each job's thread is otherwise waiting for the decoder.

The matrix's rows are the tokens fed to the decoder after the start tokens: a candidate that
ended (every candidate that is kept with text) feeds all its tokens; one cut at the token budget
all but its last, as generate() never feeds back its last token. Token k's time (its end, in
seconds into the clip) is the first frame of row k on the DTW path; tokens past the last row
repeat its time, as transformers does for the end token. Unlike generate(), the rows of a batch
never see each other's padding: a piece's word times do not depend on what it was batched with.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ifw.runner.models import WhisperModel

TIME_PRECISION = 0.02  # seconds per encoder frame
ROWS_PER_PASS = 16  # rows per teacher-forced pass: bounds the attention kept (heads x tokens x 1500 each)


def alignment_heads(whisper: WhisperModel) -> list[tuple[int, int]]:
    """(decoder layer, head) pairs whose cross-attention follows the audio: the checkpoint's, else
    every head of the upper half of the layers (OpenAI's default)."""
    heads = getattr(whisper.model.generation_config, "alignment_heads", None)
    if heads:
        return [(int(layer), int(head)) for layer, head in heads]
    cfg = whisper.model.config
    return [(layer, head) for layer in range(cfg.decoder_layers // 2, cfg.decoder_layers)
            for head in range(cfg.decoder_attention_heads)]  # fmt: skip


def matrices(whisper: WhisperModel, encoded, rows: Sequence[tuple[list[int], int, int]]) -> list[np.ndarray]:
    """The alignment heads' attention for each row, normalised, filtered and averaged over heads.

    `encoded`: the rows' encoder outputs (rows x 1500 x d, on the device). A row is (decoder input:
    start tokens then the tokens to time, how many start tokens, encoder frames of real audio).
    Returns one float32 (tokens x frames) matrix per row, on the host.
    """
    out: list[np.ndarray] = []
    for at in range(0, len(rows), ROWS_PER_PASS):
        out += _pass(whisper, encoded[at : at + ROWS_PER_PASS], rows[at : at + ROWS_PER_PASS])
    return out


def _pass(whisper: WhisperModel, encoded, rows: Sequence[tuple[list[int], int, int]]) -> list[np.ndarray]:
    import torch

    heads = alignment_heads(whisper)
    decoder = whisper.model.model.decoder
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    caught: dict[tuple[int, int], Any] = {}  # (layer, head) -> (rows, tokens, 1500)
    queries: dict[int, Any] = {}
    me = threading.get_ident()  # the model may be shared: only this pass's forward is caught

    def on_query(layer: int):
        def hook(module, args, output):
            if threading.get_ident() == me:
                queries[layer] = output

        return hook

    def on_key(layer: int):
        attn = decoder.layers[layer].encoder_attn

        def hook(module, args, output):
            if threading.get_ident() != me:
                return
            b, t, hd = queries[layer].shape[0], queries[layer].shape[1], attn.head_dim
            sel = by_layer[layer]
            # as WhisperAttention + eager attention: (q_proj(x) * scaling) @ k_proj(audio)ᵀ, softmax
            q = (queries.pop(layer) * attn.scaling).view(b, t, -1, hd)[:, :, sel].transpose(1, 2)
            k = output.view(b, -1, attn.num_heads, hd)[:, :, sel].transpose(1, 2)
            weights = torch.matmul(q, k.transpose(2, 3)).float().softmax(dim=-1)
            for n, head in enumerate(sel):
                caught[(layer, head)] = weights[:, n]

        return hook

    hooks = []
    try:
        for layer in by_layer:
            hooks.append(decoder.layers[layer].encoder_attn.q_proj.register_forward_hook(on_query(layer)))
            hooks.append(decoder.layers[layer].encoder_attn.k_proj.register_forward_hook(on_key(layer)))
        longest = max(len(seq) for seq, _, _ in rows)
        # right-padded: causal attention keeps each row's own positions as if it were alone
        ids = torch.tensor([seq + [seq[-1]] * (longest - len(seq)) for seq, _, _ in rows], device=encoded.device)
        with torch.inference_mode():
            decoder(input_ids=ids, encoder_hidden_states=encoded, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    width = getattr(whisper.model.config, "median_filter_width", 7)
    out = []
    with torch.inference_mode():
        for r, (seq, prefix, frames) in enumerate(rows):
            # heads x tokens x frames, in transformers' order of the heads
            w = torch.stack([caught[h][r, prefix : len(seq), :frames] for h in heads])
            if w.shape[1] == 0:
                out.append(np.zeros((0, w.shape[2]), np.float32))
                continue
            std = torch.std(w, dim=-2, keepdim=True, unbiased=False)
            mean = torch.mean(w, dim=-2, keepdim=True)
            w = _median_filter((w - mean) / std, width).mean(dim=0)
            out.append(w.cpu().numpy().astype(np.float32, copy=False))
    return out


def _median_filter(x, width: int):
    """transformers' _median_filter: the median of `width` values along the last axis, reflect-padded."""
    import torch

    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    x = torch.nn.functional.pad(x[None], (pad, pad, 0, 0), mode="reflect")[0]
    return x.unfold(-1, width, 1).sort()[0][..., pad]


def token_times(matrix: np.ndarray, n_tokens: int) -> list[float]:
    """End time (s into the clip) of each of n_tokens tokens, from their alignment matrix."""
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        return [0.0] * n_tokens
    text, time = dtw(-matrix)
    jumps = np.pad(np.diff(text), (1, 0), constant_values=1).astype(bool)
    times = (time[jumps] * TIME_PRECISION).tolist()
    return [times[min(k, len(times) - 1)] for k in range(n_tokens)]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `_dynamic_time_warping` (the same path, ties included), vectorised.

    Returns (text indices, time indices) of the cheapest monotonic path through `cost` (tokens x
    frames), as transformers does.
    """
    x = np.ascontiguousarray(cost)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    acc = _wavefront(x, exact=not np.isfinite(x).all())
    if not acc[0] and _has_tie(acc[1]):
        acc = _wavefront(x, exact=True)
    return _backtrace(acc[1])


def _wavefront(x: np.ndarray, exact: bool) -> tuple[bool, np.ndarray]:
    """The accumulated cost (tokens+1 x frames+1, float32), one anti-diagonal per numpy step.

    transformers picks, for each cell, the diagonal predecessor c0 if it is strictly the smallest,
    else the upper one c1 if it is strictly the smallest, else the left one c2. That is the
    minimum of the three unless c0 == c1 < c2 (then c2, which is larger), or a NaN is involved.
    The fast pass takes the minimum; `dtw` redoes it exactly (`exact`) when such a tie shows up.
    """
    n_text, n_time = x.shape
    w = n_time + 1
    acc = np.full((n_text + 1, w), np.inf, np.float32)
    acc[0, 0] = 0.0
    flat, xf = acc.reshape(-1), x.reshape(-1)
    buf = np.empty(n_text, np.float32)
    for d in range(2, n_text + n_time + 1):  # cells (i, j) with i + j = d, 1 <= i <= n_text, 1 <= j <= n_time
        lo, hi = max(1, d - n_time), min(n_text, d - 1)
        # acc's cell (i, d - i) is at flat index d + i * n_time: a diagonal is a strided slice
        a, b = d + lo * n_time, d + hi * n_time + 1
        c0, c1, c2 = flat[a - w - 1 : b - w - 1 : n_time], flat[a - w : b - w : n_time], flat[a - 1 : b - 1 : n_time]
        best = buf[: hi - lo + 1]
        if exact:
            t0 = (c0 < c1) & (c0 < c2)
            t1 = (c1 < c0) & (c1 < c2)
            np.copyto(best, np.where(t0, c0, np.where(t1, c1, c2)))
        else:
            np.minimum(c0, c1, out=best)
            np.minimum(best, c2, out=best)
        # x's cell (i-1, j-1) is at d + i * (n_time - 1) - n_time - 1; the sum rounds to float32 as in transformers
        s = d + lo * (n_time - 1) - n_time - 1
        m = xf[s : s + (hi - lo) * (n_time - 1) + 1 : max(1, n_time - 1)]
        np.add(m, best, out=flat[a:b:n_time], casting="same_kind")
    return exact, acc


def _has_tie(acc: np.ndarray) -> bool:
    """Whether some cell has c0 == c1 < c2, where the minimum is not transformers' choice.
    (Row 1's c0 and c1 lie in row 0, inf but for (0, 0): no such tie there.)"""
    eq = acc[1:-1, :-1] == acc[1:-1, 1:]
    return bool(eq.any() and (eq & (acc[1:-1, :-1] < acc[2:, :-1])).any())


def _backtrace(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' backtrace, each step's choice recomputed from the costs along the path only."""
    rows, w = acc.shape
    costs = memoryview(acc).cast("B").cast("f")  # Python floats: fast to index one at a time
    i, j = rows - 1, w - 1
    k = i * w + j
    text: list[int] = []
    time: list[int] = []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        if i == 0:  # transformers' trace[0, :] = 2
            j, k = j - 1, k - 1
            continue
        if j == 0:  # trace[:, 0] = 1
            i, k = i - 1, k - w
            continue
        c0, c1, c2 = costs[k - w - 1], costs[k - w], costs[k - 1]
        if c0 < c1 and c0 < c2:
            i, j, k = i - 1, j - 1, k - w - 1
        elif c1 < c0 and c1 < c2:
            i, k = i - 1, k - w
        else:
            j, k = j - 1, k - 1
    return np.array(text[::-1], dtype=np.int64), np.array(time[::-1], dtype=np.int64)
