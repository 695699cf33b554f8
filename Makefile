.PHONY: setup demo test bench down

PYTEST_ARGS ?=

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	python3 -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): the test set-up is broken" >&2; exit 1; fi; \
	exit $$rc

bench: setup
	python3 bench/ingest.py
	python3 bench/restore.py

down:
	THAW_STATE_DIR=$${THAW_STATE_DIR:-$$PWD/.state} thaw down
