# The two commands the README promises: `make demo` (set up + run the embedded default) and `make test`.
.PHONY: setup demo test
setup:
	@bash scripts/setup.sh
demo: setup
	.venv/bin/loratune train
test: setup
	.venv/bin/python -m pytest -q
