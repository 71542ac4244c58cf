# Two entry points for a fresh machine: `make run` and `make test`.
# Both install what they need: Debian packages when root, Python packages in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/tunnelwatch.toml
DEBIAN_TEST_PACKAGES := nginx-light dnsmasq-base microsocks shadowsocks-libev tinyproxy iptables chromium wireguard-go wireguard-tools postgresql strace prometheus tor v2ray openvpn
DEBIAN_BENCH_PACKAGES := nginx-light dnsmasq-base microsocks prometheus-blackbox-exporter wrk postgresql valgrind

.PHONY: run test lint venv test-deps bench clean

$(BIN)/tunnelwatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/tunnelwatch

run: venv
	$(BIN)/tunnelwatch run --config $(CONFIG)

test-deps:
	@scripts/install-debian-packages $(DEBIAN_TEST_PACKAGES)

# The style and the architecture first (seconds), then every test.
lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint test-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# Every benchmark, about 30 minutes; rewrites bench/RESULTS.md. Not part of `make test`.
bench: venv
	@scripts/install-debian-packages $(DEBIAN_BENCH_PACKAGES)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
