# The two commands of the README. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lint test test-slow bench clean

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
	cd benchmarks && ../$(BIN)/python latency.py
	cd benchmarks && ../$(BIN)/python handwritten.py
	cd benchmarks && ../$(BIN)/python scoped_latency.py
	cd benchmarks && ../$(BIN)/python cli_help.py

clean:
	rm -rf $(VENV) demo-out
