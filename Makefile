# itermask-qc developer entry points.
#   make demo   install, build the bundled synthetic BIDS demo, run participant + group
#   make test   install, run the default test suite (no network, no GPU)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install.stamp
export NIPYPE_NO_ET := 1
export PYTHONDONTWRITEBYTECODE := 1

# Optional: screen the demo with another model folder: make demo DEMO_MODEL=path/to/model
DEMO_MODEL ?=

.PHONY: install demo test test-all gpu-carry clean

install: $(STAMP)

# torch is pinned (a CPU wheel of torch==2.13.0 is on disk); it is installed
# first so that nothing resolves an unpinned PyTorch to a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: install
	rm -rf demo_output
	$(BIN)/itermask-qc-synth demo demo_data --overwrite
	$(BIN)/itermask-qc demo_data demo_output participant -w demo_work --nprocs 2 $(if $(DEMO_MODEL),--model-dir $(DEMO_MODEL)) \
		|| [ $$? -eq 1 ]  # 1 = some scans failed (reported); anything else stops the demo
	$(BIN)/itermask-qc demo_data demo_output group --labels demo_data/sourcedata/qc_labels.tsv
	@echo "Open demo_output/group_T1w.html (and demo_output/sub-*.html) in a browser."

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m "" 

# What benchmarks/gpu_window.sh needs on a lent GPU machine (its image lacks nibabel; nothing can
# be fetched there): the nibabel wheel and the 1 mm anatomy bank, in .gpu/ (ignored; carried).
gpu-carry: install
	mkdir -p .gpu
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp -d .gpu "nibabel==$$($(BIN)/python -c 'import nibabel; print(nibabel.__version__)')"
	test -f .gpu/bank1mm.npz || $(BIN)/itermask-qc-synth bank .gpu/bank1mm.npz

clean:
	rm -rf demo_output demo_data demo_work build *.egg-info
