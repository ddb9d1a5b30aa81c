# Two entry points (see README): `make demo` runs the main job, `make test` runs lint + tests.
# Both create the virtual environment and install everything on a fresh machine that has only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch build to install; override e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" on aarch64.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DATA ?=
OUT ?= runs/demo

.PHONY: venv demo test test-fast lint browser clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/liverus demo --resume --out $(OUT) $(if $(DATA),--data $(DATA),)

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Browser tests drive Debian's Chromium through Playwright; install it when missing (needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Every test, slow and real-data ones included (plain `pytest` runs the fast selection only).
test: venv browser lint
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
