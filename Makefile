# Set-up and main jobs. `make test` and `make demo` create .venv on first use and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU/GPU users pick their own torch build, e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Debian packages, skipped where apt-get is unavailable: WordNet data for the word-level text corruptions,
# Chromium and its WebDriver for the browser test of the `queryshift serve` page (it skips without them)
APT_PACKAGES ?= wordnet-base chromium chromium-driver

.PHONY: setup system-deps test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[all]"
	touch $@

system-deps:
	@if [ -d /usr/share/wordnet ] && command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	else echo "note: install $(APT_PACKAGES) (WordNet data for the word-level text corruptions, Chromium for the serve page test)"; fi

setup: system-deps $(VENV)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks lab

test: setup lint
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

demo: setup
	$(BIN)/python -m queryshift.demo

clean:
	rm -rf $(VENV) demo-results .pytest_cache .ruff_cache site
