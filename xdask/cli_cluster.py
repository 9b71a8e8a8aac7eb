"""``xdask-worker``: ``dask worker`` with what an xdask worker needs.

In cluster mode every machine runs one ``xdask-worker``, which is ``dask
worker`` plus three things a plain ``dask worker`` would lack:

- ``--resources GPU=N``, N being the NVIDIA GPUs this process may use
  (``nvidia-smi -L``, narrowed by ``CUDA_VISIBLE_DEVICES``). A machine
  without GPUs gets no ``GPU`` resource at all, as in ``xdask-local``: a
  resource of 0 would say nothing more, and placement reads a missing
  ``GPU`` as 0. An explicit ``--resources`` that names ``GPU`` wins over
  detection; one that names other resources only gets ``GPU=N`` added.
- ``--preload xdask.cluster.worker``: the worker's xdask log
  (``XDASK_HOME/logs/worker_<ms>/xdask.log``, at ``--log-level``, which is
  xdask's option and not passed on) and its GPU ledger.
- xdask's Dask settings (``xdask.local.dask-config`` in ``xdask/xdask.yaml``:
  non-daemonic workers so engines may start processes, no
  ``MALLOC_TRIM_THRESHOLD_``/``OMP_NUM_THREADS`` from the nanny, profiler
  off, slower admin timers), set in ``dask.config`` here; the nanny hands
  its config to the worker process it spawns.

Every other argument goes to ``dask worker`` unchanged, and the scheduler
may be given as ``--scheduler ADDRESS`` or positionally as ``dask worker``
takes it.

Why in-process (``distributed.cli.dask_worker.main``) rather than a
``dask worker`` child: this process then *is* the ``dask worker`` process,
so SIGINT/SIGTERM reach Dask's own handlers (which close the nannies
gracefully), its exit code is ours, and no signal forwarding or orphaned
child can go wrong.

Examples
--------
.. code-block:: bash

    xdask-worker --scheduler tcp://10.0.0.1:8786 --nthreads 4 --name gpu-node-1
    CUDA_VISIBLE_DEVICES=2,3 xdask-worker tcp://10.0.0.1:8786 --memory-limit 64GB
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import dask.config

from xdask import config
from xdask.engines.host import detect_gpu_count

#: The worker-side preload: the log and the GPU ledger (``dask_setup``).
WORKER_PRELOAD = "xdask.cluster.worker"


def _option_value(args: list[str], i: int, name: str) -> tuple[str | None, int]:
    """The value of option ``name`` at ``args[i]`` (``--name v`` or ``--name=v``) and how many items it spans."""
    arg = args[i]
    if arg.startswith(name + "="):
        return arg[len(name) + 1 :], 1
    if arg == name:
        return (args[i + 1], 2) if i + 1 < len(args) else (None, 1)
    return None, 0


def _resource_names(spec: str) -> set[str]:
    """Names in a ``dask worker --resources`` value: ``"GPU=2 foo=1"`` or ``"GPU=2,foo=1"``."""
    return {pair.partition("=")[0] for pair in spec.replace(",", " ").split()}


def build_worker_argv(args: Sequence[str], n_gpu: int | None = None) -> list[str]:
    """The ``dask worker`` arguments for ``xdask-worker args``.

    ``n_gpu`` is the GPU count to advertise (``None``: detect it with
    :func:`~xdask.engines.host.detect_gpu_count`). Raises
    ``click.UsageError`` on a ``--scheduler`` without a value.

    >>> build_worker_argv(["--scheduler", "tcp://h:8786", "--nthreads", "2"], n_gpu=2)
    ['tcp://h:8786', '--resources', 'GPU=2', '--preload', 'xdask.cluster.worker', '--nthreads', '2']
    >>> build_worker_argv(["tcp://h:8786", "--resources", "foo=1"], n_gpu=1)
    ['--preload', 'xdask.cluster.worker', 'tcp://h:8786', '--resources', 'foo=1 GPU=1']
    >>> build_worker_argv(["--scheduler=tcp://h:8786", "--resources", "GPU=3"], n_gpu=2)
    ['tcp://h:8786', '--preload', 'xdask.cluster.worker', '--resources', 'GPU=3']
    """
    rest: list[str] = []
    scheduler: str | None = None
    resources_at: int | None = None  # index in ``rest`` of the last --resources value
    has_preload = False
    args = list(args)
    i = 0
    while i < len(args):
        if args[i] == "--":  # what follows belongs to the preloads' argv
            rest.extend(args[i:])
            break
        value, span = _option_value(args, i, "--scheduler")
        if span:
            if value is None:
                raise click.UsageError("--scheduler needs an address, e.g. tcp://10.0.0.1:8786")
            scheduler = value
            i += span
            continue
        value, span = _option_value(args, i, "--resources")
        if span and value is not None:
            rest.extend(["--resources", value])
            resources_at = len(rest) - 1
            i += span
            continue
        value, span = _option_value(args, i, "--preload")
        if span and value is not None:
            has_preload = has_preload or value == WORKER_PRELOAD
        rest.extend(args[i : i + max(span, 1)])
        i += max(span, 1)

    ours: list[str] = []
    given = _resource_names(rest[resources_at]) if resources_at is not None else set()
    if "GPU" not in given:
        count = detect_gpu_count() if n_gpu is None else n_gpu
        if count > 0:
            if resources_at is None:
                ours += ["--resources", f"GPU={count}"]
            else:
                rest[resources_at] = f"{rest[resources_at]} GPU={count}"
    if not has_preload:
        ours += ["--preload", WORKER_PRELOAD]
    return ([scheduler] if scheduler else []) + ours + rest


def pop_log_level(args: list[str]) -> tuple[list[str], str | None]:
    """``args`` without xdask's ``--log-level LEVEL`` (``dask worker`` has no such option), and the level.

    >>> pop_log_level(["tcp://h:8786", "--log-level", "debug", "--nthreads", "2"])
    (['tcp://h:8786', '--nthreads', '2'], 'debug')
    >>> pop_log_level(["--log-level=WARNING"])
    ([], 'WARNING')
    """
    rest: list[str] = []
    level: str | None = None
    i = 0
    while i < len(args):
        if args[i] == "--":
            rest.extend(args[i:])
            break
        value, span = _option_value(args, i, "--log-level")
        if span:
            if value is None:
                raise click.UsageError("--log-level needs a level, e.g. DEBUG")
            level = value
            i += span
            continue
        rest.append(args[i])
        i += 1
    return rest, level


def apply_worker_dask_config() -> None:
    """Put ``xdask.local.dask-config`` into this process's ``dask.config``.

    Change the block (``~/.config/dask/*.yaml``, key ``xdask.local.dask-config``)
    to change what workers get; ``xdask-local`` applies the same block.
    """
    dask.config.set(dict(config.get("local.dask-config") or {}))


def worker_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``xdask-worker``; never returns (``dask worker`` exits the process)."""
    from distributed.cli.dask_worker import main as dask_worker

    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args:
        click.echo("xdask-worker: dask worker with --resources GPU=<detected>, --preload "
                   f"{WORKER_PRELOAD} and xdask's Dask settings.\nAlso accepts --scheduler ADDRESS and "
                   "--log-level LEVEL (xdask's log; default XDASK_LOG_LEVEL, else INFO). "
                   "The options of dask worker follow.\n")
    try:
        args, level = pop_log_level(args)
        if level is not None:
            from xdask.logs import log_level

            try:
                # The nanny hands dask.config to the worker process, whose preload reads the level.
                dask.config.set({"xdask.logs.level": log_level(level)})
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        worker_args = build_worker_argv(args)
    except click.UsageError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    if "--help" not in args:
        click.echo(f"xdask-worker: dask worker {' '.join(worker_args)}", err=True)
    apply_worker_dask_config()
    dask_worker.main(args=worker_args, prog_name="xdask-worker")


if __name__ == "__main__":
    worker_main()
