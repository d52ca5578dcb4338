# The two commands README.md promises. Both run the idempotent set-up first.
.PHONY: setup demo test bench bench-quick

PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2
export PYANNOTE_METRICS_ENABLED := 0
export HF_HUB_OFFLINE := 1

setup:
	bash .ci/setup

# The main job: the local stack (apiserver, operator, gateway, runner) transcribes
# a spoken sample on CPU with the packaged weights. ARGS="--serve" keeps it up.
demo: setup
	bash .ci/demo $(ARGS)

# Every test: unit, contract and operator tests against a real kube-apiserver,
# model tests on real weights and real speech, gateway tests over HTTP.
test: setup
	$(PY) -m pytest

# Benchmarks print figures and ratios against a baseline measured in the same run.
# bench.gateway holds 10,000 sync requests (targets: RSS <= 600 MB, p99 <= 200 ms).
bench: setup
	$(PY) -m bench.runner_cpu
	$(PY) -m bench.control_plane --rate 30
	$(PY) -m bench.gateway
	$(PY) -m bench.pool --repeats 3 --clips 16 --skip-job-burst
	$(PY) -m bench.fanout --minutes 60 --shards 1,2,4

# Every benchmark's --quick form, as CI runs them (tests/bench/test_benchmarks_run.py): minutes.
bench-quick: setup
	$(PY) -m pytest -q tests/bench/test_benchmarks_run.py
