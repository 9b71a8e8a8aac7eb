"""The one harness every benchmark under ``tests/benchmarks/`` runs on.

Why one harness: README.md compares engines, runs and machines, which only
means something when every figure is taken the same way. So here, once:

* the machine a figure came from (CPU, cores, RAM, GPUs, package versions,
  git commit), recorded next to the figure;
* requests run the same way: N requests (or T seconds) with C in flight, from
  threads for in-process engines or one asyncio loop for HTTP (a cheap client);
* tokens come from what the engine or server reports (``usage``, the final
  ``Delta``), never estimated from text;
* percentiles, ratios, warm-up and alternation of the compared sides (so both
  see the same noise on a shared machine) are computed one way;
* results go to ``results/<name>.json``, which ``readme_tables.py`` turns into
  README.md's tables. Scripts still print their figures for the person running them.

Examples
--------
From ``tests/benchmarks/`` (the scripts import it as a sibling module):

>>> import harness                                                          # doctest: +SKIP
>>> run = harness.run_threads(lambda i: harness.Reply(tokens=8), concurrency=4, n=16)  # doctest: +SKIP
>>> run.tokens, run.requests                                                # doctest: +SKIP
(128, 16)
>>> harness.write_result("demo", {"tok_s": run.tok_s}, settings={"n": 16})  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent
REPO_DIR = TESTS_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# tests/ first, for the shared helpers (``support.servers``, ``support.tiny_models``); the repository
# last, so that a lent GPU machine without xdask installed still imports it from the checkout.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
if str(REPO_DIR) not in sys.path:
    sys.path.append(str(REPO_DIR))

if TYPE_CHECKING:
    import httpx
    from support.servers import LocalServer

T = TypeVar("T")

#: The prompts of the generation benchmarks: the same sixteen everywhere, so runs compare.
STORY_PROMPTS: list[str] = [f"Write a short story about a {thing}." for thing in (
    "dragon", "robot", "sailor", "baker", "river", "mountain", "cat", "clock",
    "lighthouse", "violin", "garden", "comet", "train", "forest", "mirror", "key")]

#: Packages every result records (with the ones a benchmark names).
BASE_PACKAGES = ("xdask", "dask", "distributed", "httpx")


# -- machine facts -------------------------------------------------------------------


def cores() -> int:
    """CPU cores this process may run on (what engines size their thread pools by)."""
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    """GPUs as ``nvidia-smi`` reports them; none where it is missing (asking torch would import it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, mem, driver = (x.strip() for x in line.split(","))
        gpus.append({"name": name, "memory_mib": int(float(mem)), "driver": driver})
    return gpus


def _git() -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of ``names`` (distribution names), read from metadata: nothing is imported."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_facts(packages: Iterable[str] = ()) -> dict[str, Any]:
    """What a figure depends on besides the code: hardware, load, versions and the commit.

    The load average is there because the project's machines are shared: a
    figure taken at load 4 on two cores is not comparable with one at load 0.
    """
    return {
        "cpu": _cpu_model(),
        "cores": cores(),
        "ram_gib": _ram_gib(),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(dict.fromkeys([*BASE_PACKAGES, *packages])),
        "git": _git(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# -- running requests ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What one request gave back: its completion tokens, as the engine or server counted them.

    ``tokens`` is the reply's ``usage.completion_tokens`` (or what a benchmark
    counts instead, e.g. embeddings); ``ttft_s`` is set by streamed calls.
    """

    tokens: int
    ttft_s: float | None = None


#: One request: takes the request's index (to pick its prompt), returns its reply.
Call = Callable[[int], Reply]
AsyncCall = Callable[[int], Awaitable[Reply]]
#: ``complete(prompt, max_tokens) -> Reply``: an engine or a server, called the same way.
Complete = Callable[[str, int], Reply]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(b: float, a: float) -> float:
    """``b / a`` (xdask over the baseline); nan when the baseline is zero."""
    return b / a if a else math.nan


@dataclass
class Run:
    """Requests run at one concurrency: their replies, their latencies and the wall time."""

    concurrency: int
    wall_s: float
    replies: list[Reply] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        """Requests that completed."""
        return len(self.replies)

    @property
    def tokens(self) -> int:
        """Completion tokens of all replies, as the engine or server counted them."""
        return sum(r.tokens for r in self.replies)

    @property
    def tok_s(self) -> float:
        """Tokens per second of wall time (all requests, start of the first to end of the last)."""
        return self.tokens / self.wall_s if self.wall_s else math.nan

    def latency_ms(self, q: float = 50) -> float:
        """The ``q``-th percentile of request latency (start to last byte), in ms."""
        return percentile(self.latencies_s, q) * 1000

    def ttft_ms(self, q: float = 50) -> float:
        """The ``q``-th percentile of time to first token of the streamed replies, in ms."""
        return percentile([r.ttft_s for r in self.replies if r.ttft_s is not None], q) * 1000

    def figures(self) -> dict[str, Any]:
        """The run as JSON-ready figures (percentiles p50/p90/p99 in ms)."""
        out: dict[str, Any] = {"requests": self.requests, "concurrency": self.concurrency, "tokens": self.tokens,
                               "wall_s": self.wall_s, "tok_s": self.tok_s,
                               "latency_ms": {f"p{q}": self.latency_ms(q) for q in (50, 90, 99)}}
        if any(r.ttft_s is not None for r in self.replies):
            out["ttft_ms"] = {f"p{q}": self.ttft_ms(q) for q in (50, 90, 99)}
        return out


class _Tickets:
    """Hands out request indices until ``n`` are out or ``seconds`` have passed."""

    def __init__(self, n: int | None, seconds: float | None):
        if n is None and seconds is None:
            raise ValueError("give n (requests) or seconds")
        self.n, self.stop_at, self.next = n, None if seconds is None else time.monotonic() + seconds, 0
        self.lock = threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            if (self.n is not None and self.next >= self.n) or (self.stop_at and time.monotonic() >= self.stop_at):
                return None
            self.next += 1
            return self.next - 1


def run_threads(call: Call, concurrency: int, n: int | None = None, seconds: float | None = None) -> Run:
    """``n`` requests (or as many as fit in ``seconds``) from ``concurrency`` threads.

    Threads, because in-process engines are synchronous and are called from
    one thread per request, exactly as xdask's model actor calls them.
    """
    tickets = _Tickets(n, seconds)
    run = Run(concurrency, 0.0)
    lock = threading.Lock()

    def worker() -> None:
        while (i := tickets.take()) is not None:
            t0 = time.perf_counter()
            reply = call(i)
            elapsed = time.perf_counter() - t0
            with lock:
                run.replies.append(reply)
                run.latencies_s.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    run.wall_s = time.perf_counter() - start
    return run


async def run_async(call: AsyncCall, concurrency: int, n: int | None = None, seconds: float | None = None) -> Run:
    """``n`` requests (or as many as fit in ``seconds``) with ``concurrency`` in flight on this loop.

    One asyncio loop is the cheapest client there is: on a small machine the
    client shares the cores with the server, and threads would take more of them.
    """
    tickets = _Tickets(n, seconds)
    run = Run(concurrency, 0.0)

    async def worker() -> None:
        while (i := tickets.take()) is not None:
            t0 = time.perf_counter()
            reply = await call(i)
            run.latencies_s.append(time.perf_counter() - t0)
            run.replies.append(reply)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - start
    return run


def on_prompts(complete: Complete, prompts: Sequence[str], max_tokens: int) -> Call:
    """A ``Call`` that sends request ``i`` the prompt ``prompts[i % len(prompts)]``."""
    return lambda i: complete(prompts[i % len(prompts)], max_tokens)


def warm_up(*calls: Callable[[int], object], times: int = 1) -> None:
    """Call each ``times`` times and drop the results.

    First calls allocate buffers, start threads and compile kernels; a
    figure that includes them measures start-up, not serving.
    """
    for call in calls:
        for i in range(times):
            call(i)


def interleave(sides: Mapping[str, Callable[[int], object]], n: int) -> dict[str, list[float]]:
    """Seconds of each of ``n`` calls per side, the sides taking turns call by call.

    Why: on a shared machine noise comes in bursts; alternating each call (and
    which side goes first) gives every side the same bursts, which running
    one side after the other does not.
    """
    names = list(sides)
    spent: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            sides[name](i)
            spent[name].append(time.perf_counter() - t0)
    return spent


def alternate(sides: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Each side's result per round, which side goes first alternating between rounds (see ``interleave``)."""
    names = list(sides)
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(sides[name]())
    return out


# -- engines in-process -----------------------------------------------------------------


def engine_complete(engine: Any, temperature: float = 0.0) -> Complete:
    """``complete`` through an xdask engine's ``generate``, as the model actor calls it.

    Tokens are the final ``Delta``'s ``completion_tokens`` (the engine's own count).
    """
    from xdask.engines.base import Delta, SamplingParams

    def complete(prompt: str, max_tokens: int) -> Reply:
        t0 = time.perf_counter()
        first: float | None = None
        last: Delta | None = None

        def emit(delta: Delta) -> bool:
            nonlocal first, last
            if first is None and delta.text:
                first = time.perf_counter() - t0
            last = delta
            return False

        engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=temperature), emit)
        if last is None or last.completion_tokens is None:
            raise RuntimeError(f"{type(engine).__name__} reported no completion_tokens")
        return Reply(last.completion_tokens, first)

    return complete


# -- xdask over HTTP ----------------------------------------------------------------------


def xdask_home() -> str:
    """``XDASK_HOME`` (a fresh temporary one unless set): where in-process lookups find the model cache."""
    return os.environ.setdefault("XDASK_HOME", tempfile.mkdtemp(prefix="xdask-bench-home-"))


@contextmanager
def local_server(home: str | Path | None = None) -> Iterator[LocalServer]:
    """A running ``xdask-local`` (the tests' ``LocalServer``) for the block; stopped on the way out.

    SIGTERM (``timeout``, a CI runner) exits through the block too: the server
    runs in its own session, so without this it would outlive a killed benchmark.
    """
    from support.servers import LocalServer

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = LocalServer(Path(home or tempfile.mkdtemp(prefix="xdask-bench-")))
    try:
        yield server
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def launch(base_url: str, body: Mapping[str, Any], timeout: float = 900) -> str:
    """``POST /v1/models`` and wait until ready; the model's uid. Raises with the server's message."""
    import httpx

    resp = httpx.post(f"{base_url}/v1/models", json=dict(body), timeout=timeout)
    if resp.status_code != 200:
        raise RuntimeError(f"launch failed ({resp.status_code}): {resp.text[:500]}")
    return resp.json()["model_uid"]


def _completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def _usage_tokens(body: Mapping[str, Any]) -> int:
    usage = body.get("usage") or {}
    if "completion_tokens" not in usage:
        raise RuntimeError(f"no usage.completion_tokens in the reply: {str(body)[:300]}")
    return int(usage["completion_tokens"])


def complete_http(http: httpx.Client, model: str) -> Complete:
    """``complete`` through ``POST /v1/completions`` on a synchronous client (for latency samples)."""

    def complete(prompt: str, max_tokens: int) -> Reply:
        resp = http.post("/v1/completions", json=_completion_body(model, prompt, max_tokens))
        resp.raise_for_status()
        return Reply(_usage_tokens(resp.json()))

    return complete


def async_client(base_url: str, concurrency: int, headers: Mapping[str, str] | None = None,
                 timeout: float = 600) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` with one pooled connection per request in flight."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, headers=dict(headers or {}))


async def acomplete(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Reply:
    """One ``POST /v1/completions`` (not streamed)."""
    resp = await http.post("/v1/completions", json=_completion_body(model, prompt, max_tokens))
    resp.raise_for_status()
    return Reply(_usage_tokens(resp.json()))


async def astream_chat(http: httpx.AsyncClient, url: str, model: str, content: str, max_tokens: int) -> Reply:
    """One streamed chat completion at ``url``: TTFT at the first content chunk, tokens from the usage chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first: float | None = None
    tokens: int | None = None
    async with http.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: {resp.status_code} {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = _usage_tokens(chunk)
    if tokens is None:
        raise RuntimeError(f"{url}: the stream carried no usage chunk")
    return Reply(tokens, first)


def http_completions(base_url: str, models: str | Sequence[str], prompts: Sequence[str], concurrency: int,
                     max_tokens: int, n: int | None = None, seconds: float | None = None) -> Run:
    """Completions over HTTP with ``concurrency`` in flight; request ``i`` asks ``models[i % len(models)]``.

    Several models: the client splits the load between them evenly itself (no server-side routing).
    """
    names = [models] if isinstance(models, str) else list(models)

    async def go() -> Run:
        async with async_client(base_url, concurrency) as http:
            return await run_async(lambda i: acomplete(http, names[i % len(names)], prompts[i % len(prompts)],
                                                       max_tokens), concurrency, n, seconds)

    return asyncio.run(go())


# -- output -------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def print_table(header: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    """Print aligned columns (first left, the rest right) for the person running the benchmark."""
    cells = [list(header), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(header))]
    if title:
        print(f"\n{title}")
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths[:len(row)],
                                                                                          strict=True))))
    sys.stdout.flush()


def add_result_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--result NAME``: the results file a script writes (``-``: none, e.g. for a smoke run)."""
    parser.add_argument("--result", default=default, metavar="NAME",
                        help=f"write tests/benchmarks/results/NAME.json (default: {default}; '-': write none)")


def command_line() -> str:
    """The command that is running, as someone would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO_DIR))
    except ValueError:
        shown = sys.argv[0]
    return shlex.join(["python", shown, *sys.argv[1:]])


def _jsonable(value: Any) -> Any:
    """Floats rounded to 4 decimals (the noise is far above that), nan as null, tuples as lists."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 4)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_result(name: str, figures: Mapping[str, Any], *, benchmark: str | None = None,
                 settings: Mapping[str, Any] | None = None, packages: Iterable[str] = (),
                 notes: Sequence[str] = (), source: str = "run", machine: Mapping[str, Any] | None = None,
                 command: str | None = None, date: str | None = None, results_dir: Path = RESULTS_DIR) -> Path | None:
    """Write ``results/<name>.json``: the figures with what produced them; None when ``name`` is ``-``.

    ``benchmark`` says which table layout ``readme_tables.py`` renders the
    figures with (default: ``name``); ``packages`` are the distributions
    whose versions matter here; ``source`` is ``run`` for a measurement made
    now (``machine``, ``command`` and ``date`` then default to this machine,
    this command line and now) and says where the figures came from otherwise.
    """
    if not name or name == "-":
        return None
    result = {
        "name": name,
        "benchmark": benchmark or name,
        "date": date or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "command": command or command_line(),
        "machine": dict(machine) if machine is not None else machine_facts(packages),
        "settings": dict(settings or {}),
        "figures": dict(figures),
        "notes": list(notes),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(_jsonable(result), indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults: {path}", flush=True)
    return path
