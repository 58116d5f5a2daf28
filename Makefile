# Two entry points for a fresh clone (Python 3.11 only): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
DEMO_STEPS ?= 100
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: setup constraints demo test lint clean

setup: $(VENV)/.installed

# Ranges from pyproject.toml, exact tested versions from constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $@

# Re-pin constraints.txt to what the venv holds now (after an upgrade that passed the tests).
constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The main job on the toy data (paper Table 6 on toy scenes): mTEB trained on the SYNTHIA-like source only, then
# with adversarial adaptation to the Cityscapes-like target; the two compared on the target. Re-running resumes.
demo: setup
	@echo "make demo: toy SYNTHIA -> Cityscapes, mTEB source-only then adapted ($(DEMO_STEPS) steps each);" \
		"expected about 4 min on 2 CPU cores, toy data included (rendered on the first run)"
	$(LAUNCH) recipes/synthia2cityscapes.py --toy --no-adapt --resume --out $(OUT)/source-only train.iterations=$(DEMO_STEPS)
	$(LAUNCH) recipes/synthia2cityscapes.py --toy --resume --out $(OUT)/adapted train.iterations=$(DEMO_STEPS)
	$(VENV)/bin/uda-compare $(OUT)/source-only $(OUT)/adapted --split target \
		--baseline synthia2cityscapes-source-mteb --out $(OUT)/comparison.md

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
