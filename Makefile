# Two commands do all the set-up on a fresh machine:
#   make bench   environment + build, then the benchmark on its default workload
#   make test    environment + build, then the whole test suite
# The environment is .venv with torch $(TORCH) (a CUDA 13.0 build by default, so that the
# CUDA kernels compile even without a GPU) and the test tools. The extension is built in
# place by ninja, its objects kept in build/: a second command recompiles only what changed.
PYTHON ?= python3
TORCH ?= torch==2.14.1
# The model libraries the tests and the model benchmarks convert (versions matching TORCH).
MODEL_LIBS ?= torchvision==0.29.1 timm==1.0.31
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastnorm-deps

.PHONY: bench test build check info clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)" ninja numpy pytest expecttest hypothesis setuptools wheel matplotlib
	$(PY) -m pip install $(MODEL_LIBS) "$(TORCH)"
	# fastnorm importable from this checkout, as an editable install without a second build
	$(PY) -c "import site, sys; open(site.getsitepackages()[0] + '/fastnorm-checkout.pth', 'w').write(sys.argv[1])" "$(CURDIR)"
	touch $(STAMP)

build: $(STAMP)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace

bench: build
	$(PY) -m fastnorm bench $(ARGS)

test: build
	$(PY) -m pytest -q $(ARGS)

check: build
	$(PY) -m fastnorm check

info: build
	$(PY) -m fastnorm info

clean:
	rm -rf build fastnorm/*.so fastnorm.egg-info
