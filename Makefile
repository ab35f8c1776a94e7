# Two commands for a newcomer (see README):  make demo   and   make test
# Everything they need is installed here: Debian packages (openssh-server, sudo) and a venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The benchmarks compare against ansible-core and pyinfra; they get a venv of their own so that
# their dependencies (e.g. paramiko's type stubs) never change what `make test` and `lint` see.
BENCH_VENV := .venv-bench
BENCH_ARGS ?= --hosts 10 50 200 --repeat 5
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := openssh-server openssh-client sudo systemd procps

.PHONY: demo test setup system-deps lint bench clean

demo: setup ## a throwaway fleet of sshd hosts on loopback; validate, plan and run the examples
	$(BIN)/python -m maintenancebot.testing.demo

test: setup ## the whole suite, against real sshd hosts on loopback
	$(BIN)/python -m pytest -n 2 -q

lint: setup
	$(BIN)/python -m ruff check maintenancebot tests
	$(BIN)/python -m mypy

bench: system-deps $(BENCH_VENV)/.installed ## figures, not tests: vs raw paramiko, pyinfra, ansible; planning; memory
	$(BENCH_VENV)/bin/python benchmarks/ssh_bench.py $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python benchmarks/plan_bench.py

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -m venv --help >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	command -v dockerd >/dev/null 2>&1 || missing="$$missing docker.io"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -e '.[bench]'
	touch $@

clean:
	rm -rf $(VENV) $(BENCH_VENV) .demo .pytest_cache
