# The two quick-start commands (see README): `make demo` and `make test`.
# Both install what they need on a fresh Debian machine (as root): apt packages, .venv, the project.

PY ?= python3
VENV := .venv
APT_PACKAGES := containerd runc busybox-static golang-github-containerd-containerd-dev \
	golang-github-containerd-ttrpc-dev protobuf-compiler pigz \
	docker-registry skopeo apache2-utils openssl

.PHONY: setup demo test test-fast

$(VENV)/.installed: pyproject.toml setup.py
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); fi
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/python -P -m pycontainerd.api.client.init
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/python -P -m pycontainerd.cmd.demo

# Bytecode for our own modules first: the editable install compiles none, and with
# PYTHONDONTWRITEBYTECODE set every daemon, shim and pyctr a test starts would compile them all.
test: setup
	$(VENV)/bin/python -m compileall -q -j 0 core plugins api config cmd
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
