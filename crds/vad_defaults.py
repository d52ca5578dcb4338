"""spec.vad's defaults and bounds, free of imports: the runner's VAD (runner/vad.py) reads them where
pydantic may be missing (bench/gpu_bench.py on a bare GPU machine); the CRD types re-export them."""

VAD_DEFAULT_THRESHOLD = 0.5  # Silero's speech probability
VAD_DEFAULT_PREFIX_PADDING_MS = 200  # kept before (and after) each stretch of speech
VAD_DEFAULT_SILENCE_DURATION_MS = 500  # pauses shorter than this stay inside a stretch of speech
VAD_MAX_PREFIX_PADDING_MS = 2000
VAD_MAX_SILENCE_DURATION_MS = 10000
