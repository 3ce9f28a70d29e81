# The two quickstart commands. Both first install what is missing (once): Debian's Fashion-MNIST files and
# the Python packages. Set PYTHON to use another interpreter (e.g. a virtual environment's).
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: run test install

run: install
	$(PYTHON) -m oat_jax.main --config configs/default.py --workdir runs/default

test: install
	$(PYTHON) -m pytest -q -n 2

install: .deps-installed

.deps-installed: requirements.txt setup.cfg
	@[ -f $(FASHION_MNIST) ] || [ -n "$$OAT_DATA_DIR" ] || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	$(PYTHON) -m pip install -q -r requirements.txt -e '.[dev]'
	@touch $@
