# ddnngen: `make demo` runs the product end to end, `make test` runs every test.
# Both set everything up first (system packages when run as root, a virtualenv in .venv).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Chainer 7.8.1 builds from sdist only with setuptools<70 in its (isolated) build env. pip >= 26 no
# longer applies PIP_CONSTRAINT inside build isolation, so the same file is passed as a build
# constraint too, and pip itself is pinned so set-up does not change with whichever pip is newest.
PIP_VERSION := 26.3
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_BUILD_CONSTRAINT := $(CURDIR)/constraints.txt

APT_PACKAGES := python3-venv python3-dev build-essential \
	mosquitto libpaho-mqtt-dev \
	pocl-opencl-icd ocl-icd-opencl-dev opencl-headers clinfo \
	dataset-fashion-mnist openssl rabbitmq-server chromium chromium-driver \
	gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user

.PHONY: setup system-packages demo test test-fast lint bench clean

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing system packages:" $$missing; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "missing system packages; run:"; \
			echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends" $$missing; \
			exit 1; \
		fi; \
	fi

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q 'pip==$(PIP_VERSION)' wheel 'setuptools<70'
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/ddnngen demo

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# Quick feedback while editing: no full test sets, no broker, no OpenCL, no qemu (about a minute).
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not broker and not opencl and not cross" -x $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check ddnn_gen server tests bench

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build dist *.egg-info bench/out demo-out
