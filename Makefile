# The two commands of the README. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lint test test-slow bench zoo zoo-ci clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-out
	$(BIN)/surgeon add cbam resnet50 --out demo-out
	@echo
	@echo "Written:" && ls -l demo-out

lint: $(STAMP)
	$(BIN)/ruff check surgeon tests examples benchmarks

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/python surgery_time.py
	cd benchmarks && ../$(BIN)/python surgery_phases.py
	cd benchmarks && ../$(BIN)/python fx_patches.py
	cd benchmarks && ../$(BIN)/python meta_kernels.py
	cd benchmarks && ../$(BIN)/python latency.py
	cd benchmarks && ../$(BIN)/python handwritten.py
	cd benchmarks && ../$(BIN)/python cbam_pooling.py
	cd benchmarks && ../$(BIN)/python scoped_latency.py
	cd benchmarks && ../$(BIN)/python cli_help.py

# the model-zoo sweep (hours; resumable: rerun to continue, SAMPLE=N for N models per source) and its fixed
# 30-model CI sample (about 2 min; fails on any crash, identity break, timeout or memory overflow)
zoo: $(STAMP)
	cd benchmarks && ../$(BIN)/python zoo.py $(if $(SAMPLE),--sample $(SAMPLE))

zoo-ci: $(STAMP)
	rm -f zoo-ci.csv.tmp; cd benchmarks && ../$(BIN)/python zoo.py --ci --csv ../zoo-ci.csv.tmp; status=$$?; rm -f ../zoo-ci.csv.tmp; exit $$status

clean:
	rm -rf $(VENV) demo-out zoo-ci.csv.tmp
