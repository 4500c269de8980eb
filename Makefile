# Two commands do everything on a fresh machine:
#   make test   install what the tests need, then lint, type-check and test
#   make demo   run the whole BYOK flow locally (Azurite + emulator + packager + pipeline)
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INFRA_VENV := .venv-infra
APT_PACKAGES := softhsm2 openssl chromium

.PHONY: help test demo lint typecheck unit deps system-deps node-deps infra-deps bench clean package fuzz \
	offline-bundle

help:
	@echo "make test   - install dependencies, run ruff, mypy and pytest"
	@echo "make demo   - end-to-end BYOK walk-through on local services"
	@echo "make bench  - print benchmark figures (not part of the tests)"
	@echo "make fuzz   - the mutation campaign: 100,000 hostile packages (not part of the tests)"
	@echo "make package - build dist/function-app.zip, the Function's deployment package"
	@echo "make offline-bundle - build dist/byok-package-offline-VERSION.tar.gz, byok-package for"
	@echo "               the air-gapped machine (BUNDLE_ARGS=\"--python-version 3.12 --platform TAG --out F\")"

# System packages: Node.js and npm (Azurite, the local Blob Storage), SoftHSM2 (the PKCS#11 HSM
# for tests), the OpenSSL CLI (independent implementation of the wrap) and Chromium (the
# dashboard's browser test drives Debian's build through Playwright: Playwright's own browser
# download cannot work offline). Installed only when missing; needs root (CI runs as root).
# Then the versions the project needs: Python >= 3.11, Node.js >= 18 (Azurite 3.37).
system-deps:
	@missing=""; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: Python >= 3.11 is needed, $(PYTHON) is $$($(PYTHON) --version 2>&1 | head -1): install a newer python3 (and python3-venv), or run make PYTHON=python3.11"; exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 18 ? 1 : 0)' || { \
	  echo "error: Node.js >= 18 is needed for Azurite, node is $$(node --version): install a newer nodejs (Debian 12 has 18; on older releases use NodeSource or nvm), then run make again"; exit 1; }

$(VENV)/.stamp: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

deps: system-deps $(VENV)/.stamp node-deps

node_modules/.stamp: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

node-deps: node_modules/.stamp

$(INFRA_VENV)/.stamp: requirements-infra.txt
	$(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/python -m pip install -q --upgrade pip
	$(INFRA_VENV)/bin/python -m pip install -q -r requirements-infra.txt
	touch $@

infra-deps: $(INFRA_VENV)/.stamp

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# Each test folder has its own conftest.py, so mypy checks the folders one at a time.
typecheck: $(VENV)/.stamp
	$(VENV)/bin/mypy offline_packager byok_pipeline managed_hsm_emulator function_app.py benchmarks scripts tests/*.py
	@for d in tests/*/; do \
	  if ls $$d*.py >/dev/null 2>&1; then echo "mypy $$d"; $(VENV)/bin/mypy $$d || exit 1; fi; \
	done

test: deps infra-deps lint typecheck
	BYOK_INFRA_PYTHON=$(CURDIR)/$(INFRA_VENV)/bin/python $(VENV)/bin/pytest

demo: deps
	$(PY) scripts/demo.py

# The deployment package: exactly what .funcignore admits (see infra/README.md, "Publish").
package: $(VENV)/.stamp
	$(PY) scripts/build_function_zip.py --out dist/function-app.zip

# byok-package for the air-gapped machine: its wheel and its dependencies' wheels, install.py,
# SHA256SUMS (README "Install byok-package on the air-gapped machine"). Downloads from the index.
offline-bundle: $(VENV)/.stamp
	$(PY) scripts/build_offline_bundle.py $(BUNDLE_ARGS)

bench: deps
	$(PY) benchmarks/packager_bench.py
	$(PY) benchmarks/pipeline_bench.py
	$(PY) benchmarks/throughput_bench.py
	$(PY) benchmarks/emulator_bench.py

# The mutation campaign (README "Reliability"); `make test` runs a fixed-seed sample of it.
fuzz: deps
	$(PY) scripts/fuzz.py

clean:
	-[ -f .byok-dev/stack.json ] && $(VENV)/bin/byok dev down --dir .byok-dev
	rm -rf $(VENV) $(INFRA_VENV) node_modules dist artifacts .mypy_cache .ruff_cache .pytest_cache .demo .byok-dev
