"""Cluster mode from Dask's own commands: ``dask scheduler`` + ``xdask-worker`` + ``xdask-server``.

Real processes: a ``dask scheduler`` with xdask's preload, ``xdask-worker``
processes (``python -m xdask.cli_cluster``, the code behind the console
script) and ``xdask serve``. Only the parsing of ``xdask launch`` and the
rendering of ``xdask workers``/``health`` run in-process against a stand-in
client, so that they need no model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import dask.config
import pytest
from click.testing import CliRunner
from support.cluster_procs import Proc, command
from support.servers import free_port, wait_until

from xdask import cli, logs
from xdask.cli_cluster import WORKER_PRELOAD, build_worker_argv
from xdask.cluster.local import detect_gpu_count, split_gpus
from xdask.cluster.worker import PLUGIN_NAME as GPU_LEDGER

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """Child environment: this checkout importable (workers import the preload), XDASK_HOME in tmp."""
    path = os.pathsep.join([str(REPO), str(REPO / "server"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "XDASK_HOME": str(home), **extra}


def _exit_code(proc: Proc, sig: int, timeout: float = 30) -> int:
    """``kill -<sig> PID``: the signal to the main process only, then its exit code.

    Only the main process, because that is the contract under test (the
    process passes the stop on to its children). ``proc.kill()`` in each
    test's ``finally`` removes whatever is left if it does not exit in time.
    """
    proc.proc.send_signal(sig)
    return proc.proc.wait(timeout)


@pytest.fixture(scope="module")
def fake_nvidia_smi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a stand-in ``nvidia-smi`` that lists two H100s.

    This CPU machine has no NVIDIA driver, so the real tool cannot exist
    here; the stand-in prints what ``nvidia-smi -L`` prints on a 2-GPU host.
    """
    folder = tmp_path_factory.mktemp("fake-bin")
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-7d0c3b4e-0000-0000-0000-000000000000)"\n'
        'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-7d0c3b4e-0000-0000-0000-000000000001)"\n'
    )
    script.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdask-cluster-home")


@pytest.fixture(scope="module")
def scheduler(home: Path) -> Iterator[str]:
    """``dask scheduler --preload xdask.cluster.scheduler_preload`` on a free port."""
    port = free_port()
    proc = Proc("scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--dashboard-address", ":0",
                              "--preload", "xdask.cluster.scheduler_preload"], _env(home))
    try:
        assert wait_until(lambda: proc.find("Scheduler at") or proc.proc.poll() is not None, 30), proc.tail()
        assert proc.proc.poll() is None, proc.tail()
        yield f"tcp://127.0.0.1:{port}"
        assert _exit_code(proc, signal.SIGTERM) == 0, proc.tail()
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def dask_client(scheduler: str) -> Iterator[Any]:
    from distributed import Client

    with Client(scheduler, timeout=30) as client:
        yield client


@pytest.mark.slow
def test_scheduler_preload_logs_and_registers_the_registry(scheduler: str, dask_client: Any, home: Path) -> None:
    logs_ = list(home.glob("logs/scheduler_*/xdask.log"))
    assert len(logs_) == 1
    assert wait_until(lambda: "xdask registry on scheduler" in logs_[0].read_text(), 10)
    assert dask_client.run_on_scheduler(lambda dask_scheduler: "xdask-registry" in dask_scheduler.plugins)
    # The registry's handlers are there: the server's registration would find the same instance.
    assert dask_client.run_on_scheduler(lambda dask_scheduler: "xdask_models" in dask_scheduler.handlers)


@pytest.mark.slow
def test_xdask_worker_resources_options_and_sigterm(scheduler: str, dask_client: Any, home: Path,
                                                     fake_nvidia_smi: Path) -> None:
    """Three workers at once (one startup's wall time): detected, CUDA_VISIBLE_DEVICES, explicit."""
    path = f"{fake_nvidia_smi}{os.pathsep}{os.environ['PATH']}"
    env = _env(home, PATH=path)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    runs = {
        "w1": (["--scheduler", scheduler, "--nthreads", "1", "--name", "w1", "--memory-limit", "1GB"], env),
        "w-cvd": ([scheduler, "--nthreads", "1", "--name", "w-cvd"], {**env, "CUDA_VISIBLE_DEVICES": "1"}),
        "w-explicit": ([f"--scheduler={scheduler}", "--name", "w-explicit", "--nthreads", "1",
                        "--resources", "GPU=3,foo=1"], env),
    }
    procs = {name: Proc(name, command("xdask-worker", ["xdask.cli_cluster"], *args), env_)
             for name, (args, env_) in runs.items()}
    try:
        def by_name() -> dict[str, dict[str, Any]]:
            return {w["name"]: w for w in dask_client.scheduler_info()["workers"].values()}

        assert wait_until(lambda: set(procs) <= set(by_name()), 60), "".join(p.tail() for p in procs.values())
        workers = by_name()
        assert workers["w1"]["resources"] == {"GPU": 2}
        assert workers["w1"]["nthreads"] == 1 and workers["w1"]["memory_limit"] == 10**9
        assert workers["w-cvd"]["resources"] == {"GPU": 1}
        assert workers["w-explicit"]["resources"] == {"GPU": 3, "foo": 1}
        # The preload ran in each worker process: its GPU ledger and its own log.
        ledgers = dask_client.run(lambda dask_worker: dask_worker.plugins[GPU_LEDGER].total)
        assert sorted(ledgers.values()) == [1, 2, 3]
        started = "".join(path.read_text() for path in home.glob("logs/worker_*/xdask.log"))
        assert all(f"xdask worker {address} " in started for address in ledgers), started
        for proc in procs.values():
            assert _exit_code(proc, signal.SIGTERM) == 0, proc.tail()
        assert wait_until(lambda: not by_name(), 10)
    finally:
        for proc in procs.values():
            proc.kill()


@pytest.mark.slow
def test_xdask_serve_with_a_worker_then_workers_and_health(scheduler: str, dask_client: Any, home: Path,
                                                            fake_nvidia_smi: Path) -> None:
    """``xdask serve`` (= ``xdask-server``) on the preloaded scheduler; ``xdask workers``/``health`` against it."""
    def registry_id(dask_scheduler: Any) -> int:
        return id(dask_scheduler.plugins["xdask-registry"])

    preloaded = dask_client.run_on_scheduler(registry_id)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = _env(home, PATH=f"{fake_nvidia_smi}{os.pathsep}{os.environ['PATH']}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    procs = [
        Proc("worker", command("xdask-worker", ["xdask.cli_cluster"], scheduler, "--name", "gpu-node"), env),
        Proc("server", [sys.executable, "-m", "xdask.cli", "serve", "--scheduler", scheduler,
                        "--host", "127.0.0.1", "--port", str(port)], env),
    ]
    worker, server = procs

    def xdask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xdask.cli", *args, "-e", endpoint], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    try:
        assert wait_until(lambda: server.find("xdask is serving") or server.proc.poll() is not None, 30), server.tail()
        assert server.find(r"logs: .*/logs/server_\d+/xdask\.log"), server.tail()
        # The server's registration on connect kept the preloaded registry (idempotent): same instance.
        assert dask_client.run_on_scheduler(registry_id) == preloaded
        assert wait_until(lambda: len(dask_client.scheduler_info()["workers"]) == 1, 30), worker.tail()

        table = xdask("workers")
        assert table.returncode == 0, table.stderr
        row = next(line for line in table.stdout.splitlines() if "gpu-node" in line)
        assert "0/2" in row and "free [0, 1]" in row, table.stdout
        assert [w["name"] for w in json.loads(xdask("workers", "--json").stdout)] == ["gpu-node"]
        health = xdask("health")
        assert health.returncode == 0 and "status: ok" in health.stdout, health.stdout + health.stderr

        for proc in procs:
            assert _exit_code(proc, signal.SIGINT) == 0, proc.tail()
    finally:
        for proc in procs:
            proc.kill()
    assert cli.main.commands["serve"] is cli.server_main


@pytest.mark.slow
def test_xdask_local_with_two_workers(tmp_path: Path, fake_nvidia_smi: Path) -> None:
    """Two local workers on a (stand-in) 2-GPU machine: each gets its own GPU, not both."""
    from distributed import Client

    port = free_port()
    env = {**_env(tmp_path), "PATH": f"{fake_nvidia_smi}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = Proc("xdask-local", [sys.executable, "-m", "xdask.cli_local", "--host", "127.0.0.1",
                                "--port", str(port), "--n-workers", "2"], env)
    try:
        assert wait_until(lambda: proc.find("Press Ctrl-C") or proc.proc.poll() is not None, 60), proc.tail()
        address = proc.find(r"Dask scheduler (tcp://[\d.:]+)").group(1)
        with Client(address, timeout=30) as client:
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 2
            assert [w["resources"] for w in workers.values()] == [{"GPU": 1}, {"GPU": 1}]
            visible = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            assert sorted(visible.values()) == ["0", "1"]
        assert list(tmp_path.glob("logs/local_*/xdask.log"))
        assert len(list(tmp_path.glob("logs/worker_*/xdask.log"))) == 2
        assert _exit_code(proc, signal.SIGINT, timeout=60) == 0, proc.tail()
    finally:
        proc.kill()


def test_split_gpus() -> None:
    assert split_gpus(2, 2, "") == [["0"], ["1"]]
    assert split_gpus(1, 2, "") == [["0"], []]
    assert split_gpus(4, 2, "") == [["0", "2"], ["1", "3"]]
    assert split_gpus(2, 2, "3,GPU-abc") == [["3"], ["GPU-abc"]]


# -- in-process: GPU detection, argv, launch payload, tables, logging -------------


def test_detect_gpu_count_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch,
                                                       fake_nvidia_smi: Path) -> None:
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpu_count() == 2
    for visible, count in [("1", 1), ("0,1", 2), ("GPU-7d0c3b4e-0000-0000-0000-000000000001", 1), ("", 0),
                           ("-1", 0), ("0,-1,1", 1), ("0,1,2,3", 2)]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert detect_gpu_count() == count, visible
    monkeypatch.setenv("PATH", str(fake_nvidia_smi.parent / "no-such-folder"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert detect_gpu_count() == 0


def test_build_worker_argv() -> None:
    preload = ["--preload", WORKER_PRELOAD]
    # No GPU: no GPU resource at all; everything else passes through in order.
    assert build_worker_argv(["tcp://h:8786", "--nthreads", "2", "--no-nanny"], n_gpu=0) == [
        *preload, "tcp://h:8786", "--nthreads", "2", "--no-nanny"]
    assert build_worker_argv(["--scheduler", "tcp://h:8786"], n_gpu=4) == [
        "tcp://h:8786", "--resources", "GPU=4", *preload]
    # An explicit GPU wins (comma or space separated); other resources only get GPU added.
    assert build_worker_argv(["--resources=foo=1,GPU=2", "tcp://h:8786"], n_gpu=4) == [
        *preload, "--resources", "foo=1,GPU=2", "tcp://h:8786"]
    assert build_worker_argv(["--resources", "foo=1", "tcp://h:8786"], n_gpu=4) == [
        *preload, "--resources", "foo=1 GPU=4", "tcp://h:8786"]
    # The preload is not added twice; other preloads stay.
    assert build_worker_argv(["--preload", WORKER_PRELOAD, "--preload", "mine"], n_gpu=0) == [
        "--preload", WORKER_PRELOAD, "--preload", "mine"]
    with pytest.raises(Exception, match="--scheduler needs an address"):
        build_worker_argv(["--scheduler"], n_gpu=0)


def test_launch_payload() -> None:
    payload = cli.launch_payload(
        model_name="m", n_gpu="2", gpu_idx="0,1", replica=2, worker_ip="10.0.0.2",
        worker_address="tcp://10.0.0.2:4000", restart_on_failure=False,
        extra_args=["--n_ctx", "4096", "--flag"], kwargs=["n_parallel=8"],
    )
    assert payload == {
        "model_name": "m", "model_type": "LLM", "n_gpu": 2, "gpu_idx": [0, 1], "replica": 2,
        "worker_ip": "10.0.0.2", "worker_address": "tcp://10.0.0.2:4000", "restart_on_failure": False,
        "n_ctx": 4096, "flag": True, "n_parallel": 8,
    }
    # Left out: not sent, so the server's defaults apply.
    assert cli.launch_payload(model_name="m") == {"model_name": "m", "model_type": "LLM"}
    assert cli.launch_payload(model_name="m", n_gpu="auto")["n_gpu"] == "auto"
    for cpu in ("none", "None", "cpu", "0"):
        assert cli.launch_payload(model_name="m", n_gpu=cpu)["n_gpu"] == 0
    for bad in ({"n_gpu": "two"}, {"n_gpu": "-1"}, {"gpu_idx": "0,x"}, {"gpu_idx": "-1"}):
        with pytest.raises(Exception, match="expected"):
            cli.launch_payload(model_name="m", **bad)


class FakeClient:
    """Stands in for ``xdask.client.Client`` where a test checks only the CLI's side."""

    def __init__(self, **answers: Any):
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return self.answers[name]
        return call


def test_launch_command_sends_cluster_options(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient(launch_model="m1", describe_model={"model_engine": "llama.cpp"})
    monkeypatch.setattr(cli, "_client", lambda endpoint: fake)
    result = CliRunner().invoke(cli.main, [
        "launch", "-n", "gemma-3-270m", "-u", "m1", "--replica", "2", "--gpu-idx", "1", "--n-gpu", "none",
        "--worker-ip", "10.0.0.2", "--no-restart-on-failure", "--n_parallel", "4"])
    assert result.exit_code == 0, result.output
    assert fake.calls[0] == ("launch_model", {
        "model_name": "gemma-3-270m", "model_type": "LLM", "model_uid": "m1", "replica": 2, "gpu_idx": [1],
        "n_gpu": 0, "worker_ip": "10.0.0.2", "restart_on_failure": False, "n_parallel": 4})
    bad = CliRunner().invoke(cli.main, ["launch", "-n", "x", "--replica", "0"])
    assert bad.exit_code == 2


WORKERS = [
    {"address": "tcp://10.0.0.2:4000", "host": "10.0.0.2", "name": "gpu-1", "status": "running", "nthreads": 4,
     "resources": {"GPU": 2}, "gpus": {"total": 2, "used": [0], "free": [1]},
     "models": [{"model_uid": "qwen", "replica_id": 0, "gpu_idx": [0], "state": "ready"}],
     "memory": {"limit": 64 * 2**30, "used": 3 * 2**30}},
    {"address": "tcp://10.0.0.3:4000", "host": "10.0.0.3", "name": "cpu-1", "status": "running", "nthreads": 2,
     "resources": {}, "gpus": {"total": 0, "used": [], "free": []}, "models": [],
     "memory": {"limit": 0, "used": 512 * 2**20}},
]


def test_workers_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_client", lambda endpoint: FakeClient(list_workers=WORKERS))
    table = CliRunner().invoke(cli.main, ["workers"])
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if "10.0.0.2" in line)
    assert "1/2" in row and "used [0] free [1]" in row and "qwen:0 [0]" in row and "3.00 GiB / 64.00 GiB" in row
    cpu_row = next(line for line in table.output.splitlines() if "10.0.0.3" in line)
    assert "0/0" in cpu_row and "512.00 MiB / no limit" in cpu_row
    raw = CliRunner().invoke(cli.main, ["workers", "--json"])
    assert json.loads(raw.output) == WORKERS


def test_health_command_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    report = {"status": "ok", "scheduler": "tcp://10.0.0.1:8786", "workers": 2, "models": {"ready": 1},
              "problems": []}
    monkeypatch.setattr(cli, "_client", lambda endpoint: FakeClient(cluster_health=report))
    ok = CliRunner().invoke(cli.main, ["health"])
    assert ok.exit_code == 0 and "status: ok" in ok.output and "models: ready=1" in ok.output
    report.update(status="degraded", problems=["model qwen: replica 1 lost"])
    degraded = CliRunner().invoke(cli.main, ["health"])
    assert degraded.exit_code == 1 and "problem: model qwen: replica 1 lost" in degraded.output
    assert json.loads(CliRunner().invoke(cli.main, ["health", "--json"]).output)["status"] == "degraded"


def test_setup_logging_twice_adds_one_handler(tmp_path: Path) -> None:
    def ours() -> list[logging.Handler]:
        return [h for name in ("", "distributed", "tornado", "xdask") for h in logging.getLogger(name).handlers
                if isinstance(h, (logs._XdaskFileHandler, logs._XdaskConsoleHandler))]

    before = ours()
    try:
        with dask.config.set({"xdask.home": str(tmp_path)}):
            first = logs.setup_logging("worker", console=False)
            second = logs.setup_logging("worker")
        assert first == second
        root_files = [h for h in logging.getLogger().handlers if isinstance(h, logs._XdaskFileHandler)]
        assert len(root_files) == 1
        consoles = [h for h in logging.getLogger("xdask").handlers if isinstance(h, logs._XdaskConsoleHandler)]
        assert len(consoles) == 1
        if not before:
            assert first.parent.parent == tmp_path / "logs" and first.parent.name.startswith("worker_")
            logging.getLogger("distributed.test").warning("into the file")
            assert "into the file" in first.read_text()
    finally:
        for handler in set(ours()) - set(before):
            for name in ("", "distributed", "tornado", "xdask"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()
