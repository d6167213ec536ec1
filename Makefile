# The two commands of the README. Both do all the set-up first (scripts/setup.sh is idempotent).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cai demo

test: setup
	.venv/bin/python -m pytest
