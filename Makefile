# The two commands of the README. Each sets up what this machine is missing (scripts/setup.sh skips what is there,
# so running one again reuses the first run's installs), then runs.
PYTHON ?= python
OLDEST_PYTHON := .venv/transformers-oldest/bin/python
# On the oldest transformers hf-scd supports: everything that touches how transformers calls the cache (and the
# fidelity check's tail probe, which runs the model over a DynamicCache of its own).
OLDEST_TESTS := tests/test_compat.py tests/test_cache.py tests/test_architectures.py tests/test_payload.py tests/test_cli.py \
	tests/test_fidelity_check.py

.PHONY: demo test

demo:  ## the quickstart: a real prompt -> codes -> continued generation, beside the oracle
	bash scripts/setup.sh
	$(PYTHON) examples/quickstart.py

test:  ## the whole suite on the newest transformers, then the compatibility subset on the oldest
	bash scripts/setup.sh --qwen --space --serve --oldest
	$(PYTHON) -m pytest -q
	$(OLDEST_PYTHON) -m pytest -q $(OLDEST_TESTS)
