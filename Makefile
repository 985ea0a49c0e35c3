# Two entry points for a fresh machine: `make demo` and `make test` (and `make ui`, the web page).
# Each creates .venv and installs what it needs. torch is installed first, pinned to the
# CPU build, so nothing pulls a multi-GB CUDA wheel; a GPU user installs their own torch
# into .venv first (see README) and it is kept.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
DEMO_VIDEO ?= $(DATA)/driving_controlnext_v2_01.mp4
DEMO_REF ?= $(DATA)/ref_controlnext_v2_01.jpeg
DEMO_OUT ?= demo

.PHONY: demo ui test test-fast bench clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77" wheel  # wheel: tests/test_packaging.py builds one
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,ui]"
	touch $(STAMP)

demo: $(STAMP)
	@test -f "$(DEMO_VIDEO)" || { echo "demo: driving clip $(DEMO_VIDEO) not found; run 'make demo DEMO_VIDEO=your.mp4 DEMO_REF=your.png'"; exit 2; }
	mkdir -p $(DEMO_OUT)
	@echo "demo: the main job on the TINY preset: random weights, so the result is noise, not an animation"
	$(BIN)/svd-animate --ref "$(DEMO_REF)" --pose "$(DEMO_VIDEO)" --preset tiny --side-by-side -o $(DEMO_OUT)/animation_tiny.mp4
	$(BIN)/svd-animate pose --video "$(DEMO_VIDEO)" --ref "$(DEMO_REF)" --max-frames 48 --stride 2 \
		-o $(DEMO_OUT)/poses.npz --preview $(DEMO_OUT)/pose_preview.mp4
	@echo "demo: wrote $(DEMO_OUT)/animation_tiny.mp4 (skeleton | tiny-model output), $(DEMO_OUT)/poses.npz and $(DEMO_OUT)/pose_preview.mp4 (source | aligned skeleton | on the reference)"

ui: $(STAMP)
	@echo "ui: the web page on the TINY preset (random weights: the result is noise); --preset controlnext-svd-v2 for real weights"
	$(BIN)/svd-animate ui --preset tiny --examples "$(DATA)" --output-dir $(DEMO_OUT)/ui

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the quick subset: every module's unit tests, without the tests marked slow in tests/conftest.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/pose.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
