#!/usr/bin/env bash
# The test command of the README: install xdask with its default and test
# extras, then run the whole suite (real xdask-local processes, real model).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[default,test]'
python -m pytest -q -ra "$@"
