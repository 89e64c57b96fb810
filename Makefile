# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv from the checked-in lock file when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CUDA machines get the CUDA build of vLLM; everything else the CPU build (../shared/ENVIRONMENT.md).
LOCK := requirements/$(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu).lock
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test lock clean-venv

$(VENV)/.installed: $(LOCK) pyproject.toml
	@test -x "$(UV)" || $(PYTHON) -m pip install --user -q uv
	$(UV) venv -q --allow-existing --python 3.11 $(VENV)
	$(UV) pip sync -q --python $(PY) $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@touch $@

demo: $(VENV)/.installed
	$(PY) pipelines/demo.py --out $(DEMO_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Re-resolve the pinned stacks after changing pyproject.toml dependencies.
lock:
	$(UV) pip compile pyproject.toml --extra cpu --extra test --override requirements/overrides.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -q -o requirements/cpu.lock
	$(UV) pip compile pyproject.toml --extra gpu --extra test --override requirements/overrides.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -q -o requirements/gpu.lock

clean-venv:
	rm -rf $(VENV)
