# The commands in the README. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run install system-deps test test-rust test-python lint fmt bench fuzz clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/bin/activate:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(VENV)/bin/activate ## install tokenrelay (release build of the Rust core) into .venv
	$(PIP) install -q .

run: install ## install and start the daemon on 127.0.0.1:4141 (routes from provider keys in the environment + `mock`)
	$(VENV)/bin/tokenrelay serve $(ARGS)

dev-install: $(VENV)/bin/activate
	$(PIP) install -q -e '.[dev]'

system-deps: ## Debian packages the tests use: headless Chromium + its driver (the /ui browser test)
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
		|| echo "warning: could not install chromium; the browser test will be skipped"; \
	fi

test: system-deps dev-install test-rust test-python ## install everything and run the whole test suite (cargo test + pytest)

test-rust: ## Rust unit and property tests of the core
	cargo test --workspace --quiet

test-python: ## pytest: unit, integration (real SDKs, real processes) and fault tests
	$(PY) -m pytest -q $(ARGS)

lint: dev-install ## cargo fmt --check, clippy -D warnings, ruff, mypy --strict
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --workspace --all-targets --features python -- -D warnings
	cargo fmt --manifest-path benches/rig/Cargo.toml --check
	cargo clippy --manifest-path benches/rig/Cargo.toml --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python
	$(VENV)/bin/mypy

fmt: ## format Rust and Python
	cargo fmt --all
	cargo fmt --manifest-path benches/rig/Cargo.toml
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

bench: install ## side-by-side benchmarks (see benches/README.md)
	$(PY) benches/run.py $(ARGS)

FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= sse stream_meter decode_body
fuzz: ## fuzz the SSE parser and event decoders with cargo-fuzz, FUZZ_SECONDS per target (see fuzz/README.md)
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=8192 || exit 1; \
	done

clean: ## remove build outputs and the venv
	rm -rf target $(VENV) python/tokenrelay/*.so
