.PHONY: setup demo test bench down

PYTEST_ARGS ?=

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	python3 -m pytest $(PYTEST_ARGS)

bench: setup
	python3 bench/ingest.py
	python3 bench/restore.py

down:
	THAW_STATE_DIR=$${THAW_STATE_DIR:-$$PWD/.state} thaw down
