"""A pytest plugin: a docstring's Examples block whose first example is ``# doctest: +SKIP`` is skipped whole.

Why: many public names show a live session (a running cluster, a server, a
model) that a doctest cannot start; their authors mark the first line
``+SKIP`` and the rest of the block is that session's continuation, which
would fail on its own. Every other example runs under ``--doctest-modules``
(``pyproject.toml`` turns it on for ``xdask/``, ``server/`` and
``extensions/``), so an example that can run must run, and stays true.

Loaded with ``-p support.doctest_sketches`` (``pyproject.toml``'s ``addopts``;
``tests/`` is on ``pythonpath``).
"""

from __future__ import annotations

import doctest

import pytest
from _pytest.doctest import DoctestItem


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, DoctestItem) or item.dtest is None:
            continue
        examples = item.dtest.examples
        if examples and examples[0].options.get(doctest.SKIP):
            for example in examples:
                example.options[doctest.SKIP] = True
