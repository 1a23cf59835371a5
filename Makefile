# Two commands do all set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are ranges in pyproject.toml; these pins pick the builds this machine has on disk.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint bench mutate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(VENV)/bin/lightning-interp fit --config recipes/demo.yaml

test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
	@echo "open site/index.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/nns.py

# Mutation testing (docs/measurements/testing.md), not part of `make test`: a seeded sample of mutants per module,
# one worker. MUTATE_ARGS passes options, e.g. MUTATE_ARGS="--sample 0 lightning_interp/losses.py".
mutate: $(STAMP)
	$(PY) -c "import cosmic_ray" 2>/dev/null || $(PY) -m pip install --quiet 'cosmic-ray>=8.7'
	OMP_NUM_THREADS=1 $(PY) tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) wandb lightning_logs runs .pytest_cache site
