# sam_gap_ros developer entry points. Everything runs inside .venv/ (created by `make setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WS := .ws
STAMP := $(VENV)/.setup-stamp
COLCON := $(VENV)/bin/colcon --log-base $(WS)/log
COLCON_PATHS := --base-paths . --build-base $(WS)/build --install-base $(WS)/install
# Keep ROS traffic of tests and demos on this machine and off other DDS domains.
export ROS_LOCALHOST_ONLY ?= 1
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp

.PHONY: setup build test lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-bench.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	# The official SAM2 package is a benchmark-only reference; its setup.py imports torch,
	# so it builds against the venv's torch, and without its optional CUDA extension.
	SAM2_BUILD_CUDA=0 SAM2_BUILD_ALLOW_ERRORS=1 $(PY) -m pip install --no-build-isolation -r requirements-bench.txt
	touch $(VENV)/COLCON_IGNORE
	touch $@

build: setup
	mkdir -p $(WS) && touch $(WS)/COLCON_IGNORE
	source $(VENV)/bin/activate && $(COLCON) build $(COLCON_PATHS) --event-handlers console_cohesion+

test: build
	source $(VENV)/bin/activate && source $(WS)/install/setup.bash && \
	  $(COLCON) test $(COLCON_PATHS) --event-handlers console_direct+ \
	    --pytest-args -p no:cacheprovider -ra && \
	  $(COLCON) test-result --test-result-base $(WS)/build --verbose

lint: setup
	$(VENV)/bin/ruff check sam_gap_ros training test benchmarks launch
	$(VENV)/bin/flake8 sam_gap_ros training test benchmarks launch

# hybrid, the product's default mode (the tiny SAM3 finds the apples, the tiny SAM2 tracks
# them); `make demo DEMO_MODE=sam2` (boxes on the first frame's apples) or `=sam3`.
DEMO_MODE ?= hybrid

demo: build
	source $(VENV)/bin/activate && source $(WS)/install/setup.bash && \
	  $(PY) -m sam_gap_ros.demo --output demo_output --mode $(DEMO_MODE)

clean:
	rm -rf $(WS) demo_output
