# vidrank — the commands the README and .ci/run use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
REGISTRY ?= registry
PORT   ?= 8000
DEMO_IMPRESSIONS ?= 300000
DEMO_DATA ?= data/demo
FUSION_PROFILES ?= docker/fusion_profiles.toml
FUZZ_SECONDS ?= 600

LOCK   := requirements.lock
# pip-compile over every extra: one consistent set of exact versions for CI, the train image
# and the serve image (each installs its subset with `-c $(LOCK)`).
LOCK_CMD = $(BIN)/pip-compile --quiet --extra serve --extra train --extra dev --strip-extras \
	--allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	--output-file $(LOCK) pyproject.toml

.PHONY: install run serve demo-model test test-fast lint pytest pytest-baseline fuzz bench bench-quick \
	bench-archs rollout clean lock lock-upgrade

# Create/update the virtualenv from the project's own files (re-run when pyproject.toml or the
# lock changes): exactly the versions in requirements.lock.
$(BIN)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[serve,train,dev]'
	touch $@

install: $(BIN)/.installed

# Re-lock after changing pyproject.toml's dependencies (keeps the other pins), or refresh every
# pin to the newest allowed versions; torch stays 2.13.0 (the CPU wheel), as pyproject pins it.
lock: install
	$(LOCK_CMD)

lock-upgrade: install
	$(LOCK_CMD) --upgrade

# Simulate the demo world into data/demo (once), train the demo model into ./registry when it has
# no production model, publish the world's user/video features as the active snapshot when none
# is active (so /rank works by ids), then serve on :8000.
$(DEMO_DATA)/user_features_sim.parquet: | install
	$(BIN)/vidrank simulate --out $(DEMO_DATA) --impressions $(DEMO_IMPRESSIONS)

demo-model: install $(DEMO_DATA)/user_features_sim.parquet
	$(BIN)/vidrank train --registry $(REGISTRY) --data $(DEMO_DATA) --if-empty
	$(BIN)/vidrank features publish --registry $(REGISTRY) --data $(DEMO_DATA) --if-empty

run: demo-model
	VIDRANK_FUSION_PROFILES=$(FUSION_PROFILES) \
		$(BIN)/vidrank serve --registry $(REGISTRY) --host 0.0.0.0 --port $(PORT)

lint: install
	$(BIN)/ruff check model service tests benchmarks
	$(BIN)/ruff format --check model service tests benchmarks
	$(BIN)/mypy model service
	$(BIN)/lint-imports

pytest: install
	$(BIN)/pytest -q --durations=15

# The CPU-sensitive tests again on numpy's baseline kernels (every dispatchable SIMD feature this
# CPU has is disabled; numpy refuses to disable its baseline) and onnxruntime's restricted path,
# so a test that holds only on this machine's SIMD path fails here, not on a user's machine.
pytest-baseline: install
	NPY_DISABLE_CPU_FEATURES="$$($(BIN)/python -m tests.cpu_features)" \
		$(BIN)/pytest -q -n 2 -m cpu_sensitive --ort-restricted

test: lint pytest pytest-baseline

# Daily work: lint and every test that starts no process (no server, redis-server, nginx,
# subprocess or DDP training, pip, schemathesis): the `live` marker, added by tests/conftest.py.
# Two pytest-xdist workers (one per core): the in-process training tests dominate.
test-fast: install
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint && $(BIN)/pytest -q -n 2 -m "not live"; status=$$?; \
	echo "make test-fast: $$(( $$(date +%s) - start )) s"; exit $$status

# Before a release: schemathesis against a live server for FUZZ_SECONDS with a fresh seed
# (`make test` runs the same test bounded and seeded; see tests/integration/test_fuzz_api.py).
fuzz: install
	VIDRANK_FUZZ_SECONDS=$(FUZZ_SECONDS) VIDRANK_FUZZ_EXAMPLES=1000 VIDRANK_FUZZ_SEED=random \
		$(BIN)/pytest -q -s --timeout $$(( $(FUZZ_SECONDS) + 900 )) tests/integration/test_fuzz_api.py

# Benchmarks (not part of `make test`): needs Debian's wrk (apt-get install -y wrk), else a
# slower Python client is used and the results say so.
bench: install
	@command -v wrk >/dev/null || echo "wrk not found: apt-get install -y wrk (falling back to a Python client)"
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.training

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick
	$(BIN)/python -m benchmarks.training --quick

# Serving cost per --arch: FLOPs per candidate and the exported graph's CPU ms at 100/500 candidates.
bench-archs: install
	$(BIN)/python -m benchmarks.arch_cost --out benchmarks/results/arch-cost.md

# 3 replicas behind a real nginx on loopback: activate, SIGKILL one, roll back, under traffic.
rollout: install
	$(BIN)/python -m benchmarks.rollout

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
