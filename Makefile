# Two entry points (see README): `make demo` runs the main job, `make test` runs lint + tests.
# Both create the virtual environment and install everything on a fresh machine that has only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installs come from the lock file: the full dependency set pinned (Linux x86_64, CPython 3.11; the CUDA build of
# PyTorch, which runs on the CPU too). `make lock` regenerates it from pyproject.toml's ranges. Elsewhere, install
# from the ranges with another PyTorch build: make LOCK= TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" (aarch64).
LOCK ?= requirements.lock
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA ?=
OUT ?= runs/demo

.PHONY: venv demo test test-fast lint docs browser lock clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(LOCK),)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
else
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
endif
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/liverus demo --resume --out $(OUT) $(if $(DATA),--data $(DATA),)

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The user guide's topic pages (docs/, mkdocs.yml); --strict fails on a broken link or a page missing from the nav.
docs: venv
	@site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$site && rm -rf $$site

# Regenerate the lock file from pyproject.toml (needs the package index), then the ONNX deployment's (no PyTorch:
# docs/deployment.md) from requirements-onnx.in, pinned to the same versions (it reads requirements.lock).
lock: venv
	$(BIN)/python -m pip install --quiet "pip-tools>=7.4,<8"
	$(BIN)/pip-compile --quiet --extra test --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file $(LOCK) pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file requirements-onnx.lock requirements-onnx.in

# Browser tests drive Debian's Chromium through Playwright; install it when missing (needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Every test, slow and real-data ones included (plain `pytest` runs the fast selection only).
test: venv browser lint docs
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
