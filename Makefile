# The README's two commands. Each sets the environment up first (idempotent, all in .venv/).
PY := .venv/bin/python
.PHONY: setup test demo bench clean-venv

setup:
	@./tools/setup_env.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) demo.py

clean-venv:
	rm -rf .venv
