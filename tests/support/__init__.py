"""Helpers shared by the test suite (not tests themselves; pytest does not collect this folder).

``servers`` (``LocalServer``, ``DEFAULT_LAUNCH``, ``free_port``, ``wait_until``, ``engine_required``),
``cluster_procs`` (real scheduler/worker/server processes), ``media_server`` (a module's own
``xdask-local``), ``fake_hub`` (a Hugging Face / ModelScope hub on 127.0.0.1), ``engine_checks``
(engine-level comparisons against transformers), ``tiny_models`` and ``tiny_media_models``
(tiny random models built offline). ``tests/`` is on ``sys.path`` (pytest's prepend import mode,
``tests/conftest.py``), so test files import them as ``from support.servers import LocalServer``.
"""
