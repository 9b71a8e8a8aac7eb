#!/usr/bin/env bash
# The test command of the README: install xdask with its default and test
# extras, check lint and types, then run the whole suite (real xdask-local
# processes, real model), the docstring examples and the import-layer check.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[default,test]'
echo "== lint and types (ruff, mypy; configured in pyproject.toml)"
python -m ruff check .
python -m mypy
echo "== tests, docstring examples, import layers"
python -m pytest -q -ra "$@"
