"""Which xdask modules one streamed chat request runs through, from the HTTP handler to the engine.

Starts the whole stack in this one process (a Dask ``LocalCluster`` with
``processes=False``, the supervisor, the Tornado app on a free port), launches
the default GGUF model, sends one warm-up chat and then traces a second one:
every Python function call in every thread is recorded by module while that
request runs (``sys.setprofile`` / ``threading.setprofile``). It prints

* the modules of ours that ran (``xdask.*``, ``xdask_server.*``), in the order
  they were first entered, each with its call count;
* the hand-off chain: the modules that pass the request on (handler, serving,
  routing, comm, actor, engine), as opposed to helpers the chain calls
  (schemas, statistics, errors, the chat template).

Run it against any checkout (it uses only ``Supervisor.connect``, ``make_app``
and HTTP), so two versions can be compared::

    python tests/benchmarks/trace_chat_path.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

OURS = ("xdask.", "xdask_server.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ModuleTrace:
    """Counts function calls per module of ours, in the order modules are first entered."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []
        self._lock = threading.Lock()

    def record(self, frame: Any, event: str) -> None:
        """A profile event: a call into a module of ours is counted."""
        if event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if name.startswith(OURS):
            with self._lock:
                if name not in self.calls:
                    self.order.append(name)
                self.calls[name] += 1


async def main(max_tokens: int) -> dict[str, Any]:
    import httpx
    from distributed import LocalCluster

    from xdask.cluster.supervisor import Supervisor
    from xdask_server import make_app, start_http_server

    trace = ModuleTrace()
    # ``threading.setprofile`` reaches only threads started after the call, so it is set before the cluster
    # starts (Dask's worker and executor threads, the actor's request threads) and switched on by a flag.
    active = threading.Event()

    def gated(frame: Any, event: str, arg: Any) -> None:
        if active.is_set():
            trace.record(frame, event)

    threading.setprofile(gated)
    cluster = await LocalCluster(n_workers=1, threads_per_worker=4, processes=False, asynchronous=True,
                                 dashboard_address=None)
    # No watch loop and no health probes: they run beside the request and are not its path.
    supervisor = await Supervisor.connect(cluster, watch=False)
    port = _free_port()
    server = start_http_server(make_app(supervisor), "127.0.0.1", port)
    body = {"model": "gemma", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 5."}]}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            launch = {"model_name": "gemma-3-270m", "model_engine": "llama.cpp", "model_format": "ggufv2",
                      "quantization": "Q4_K_M", "model_uid": "gemma"}
            resp = await http.post("/v1/models", json=launch)
            resp.raise_for_status()
            for traced in (False, True):
                if traced:
                    active.set()
                    sys.setprofile(gated)
                started = time.perf_counter()
                async with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                    async for _ in stream.aiter_lines():
                        pass
                elapsed = time.perf_counter() - started
            active.clear()
            sys.setprofile(None)
    finally:
        server.stop()
        await supervisor.terminate_all()
        await supervisor.close()
        await cluster.close()
    return {"modules": [(m, trace.calls[m]) for m in trace.order], "count": len(trace.order),
            "seconds": round(elapsed, 3)}


def _chain(modules: list[str]) -> list[str]:
    """The modules that hand the request on: handlers, serving, supervisor/routing, comm, actor, engine."""
    roles = ("xdask_server.handlers", "xdask_server.chat", "xdask_server.serving", "xdask.cluster.serving",
             "xdask.cluster.supervisor", "xdask.cluster.routing", "xdask.cluster.stream", "xdask.cluster.actor",
             "xdask.engines.llama_cpp")
    return [m for m in modules if m.startswith(roles)]


if __name__ == "__main__":
    os.environ.setdefault("XDASK_DISABLE_HEALTH_CHECK", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = asyncio.run(main(args.max_tokens))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['count']} modules of ours ran for one streamed chat ({result['seconds']} s):")
        for module, calls in result["modules"]:
            print(f"  {module:45s} {calls:6d} calls")
        chain = _chain([m for m, _ in result["modules"]])
        print(f"hand-off chain ({len(chain)} modules): " + " -> ".join(chain))
