# har-ref: two commands for a newcomer: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= siglip
DATA ?= data/har
WEIGHTS ?= weights/$(MODEL)
OUT ?= runs/$(MODEL)
ARGS ?=

.PHONY: setup test demo pretrain train compare study bench bench-gpu clean

setup: $(STAMP)

# torch/torchvision are pinned to the wheels this machine carries (pip takes them from local disk);
# the project and its test extra (the upstream we prove parity against) come next.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m har_ref demo --out runs/demo

# Rebuilds the demo's shipped tiny checkpoints (har_ref/demo/checkpoints); not part of `make demo`.
pretrain: setup
	$(PY) -m har_ref pretrain --out har_ref/demo/checkpoints

train: setup
	$(PY) -m har_ref train --model $(MODEL) --weights $(WEIGHTS) --data $(DATA) --out $(OUT) $(ARGS)

compare: setup
	$(PY) -m har_ref compare runs/clip runs/siglip --out runs/compare

# The seed study's claims as experiments (har_ref/study/claims.toml; docs/study.md): the demo's world and its
# converted tiny checkpoints, made once, then the study, two runs at a time. Run it again to continue a stopped one.
STUDY := runs/study
study: setup $(STUDY)/data/boxes.json $(STUDY)/weights/clip/config.json $(STUDY)/weights/siglip/config.json
	$(PY) -m har_ref study har_ref/study/claims.toml --out $(STUDY) --jobs 2

$(STUDY)/data/boxes.json: | $(STAMP)
	$(PY) -m har_ref synth --out $(STUDY)/data --overwrite

$(STUDY)/weights/%/config.json: | $(STAMP)
	$(PY) -m weights_conversion hf --src har_ref/demo/checkpoints/$* --out $(STUDY)/weights/$*

bench: setup
	$(PY) tests/bench/bench.py --out bench.json

bench-gpu: setup
	$(PY) tests/bench/bench_gpu.py --out bench_gpu.json

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
