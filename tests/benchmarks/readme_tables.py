"""Rewrite README.md's benchmark tables from ``tests/benchmarks/results/*.json``.

Why: figures typed into the README by hand drift from what the benchmarks
measured, and nobody can tell which run a figure came from. Here every table
sits between two markers named after its results file,

    <!-- bench:llm:start -->
    ...generated: a line with the machine, the date and the command, then the table...
    <!-- bench:llm:end -->

and is rendered from ``results/llm.json`` by the layout its ``benchmark``
field names (``LAYOUTS`` below). Only the text between markers changes;
everything around it is left as it is.

    python tests/benchmarks/readme_tables.py            # rewrite the tables in place
    python tests/benchmarks/readme_tables.py --check    # exit 1 (and show the diff) if README.md is out of date
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR.parents[1] / "README.md"
RESULTS = BENCH_DIR / "results"
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w.-]+):start -->\n)(?P<body>.*?)(<!-- bench:(?P=name):end -->)", re.DOTALL)
MINUS = "\u2212"  # the README's minus sign


class TableError(Exception):
    """A block the results cannot fill: no results file, or no layout for its benchmark."""


# -- numbers as the README writes them -------------------------------------------------


def num(x: float | None, digits: int = 1) -> str:
    """``x`` with thousands separators and ``digits`` decimals; a dash when missing."""
    return "–" if x is None else f"{x:,.{digits}f}"


def tok(x: float | None) -> str:
    """Tokens/s: one decimal below 1,000, none above (the noise is larger than a token/s there)."""
    return num(x, 0 if x is not None and x >= 1000 else 1)


def ratio(x: float | None) -> str:
    """A ratio: two decimals (0.96)."""
    return num(x, 2)


def ms(x: float | None) -> str:
    """Milliseconds, one decimal."""
    return "–" if x is None else f"{num(x)} ms"


def signed_ms(x: float | None) -> str:
    """A difference in milliseconds with its sign (+4.1 ms, −6.7 ms)."""
    return "–" if x is None else f"{'+' if x >= 0 else MINUS}{num(abs(x))} ms"


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""
    def line(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


# -- one layout per benchmark ----------------------------------------------------------------


def llm(fig: Mapping[str, Any]) -> list[str]:
    """bench_llm.py: the backends side by side, a = in-process, b = xdask over HTTP."""
    backends = fig["backends"]
    first = next(iter(backends.values()))

    def row(label: str, key: str, k: str, fmt: Callable[[float], str], third: Callable[[Mapping], str]) -> list[str]:
        cells = [label]
        for figures in backends.values():
            v = figures[key].get(k)
            cells += [fmt(v["a"]), fmt(v["b"]), third(v)] if v else ["–"] * 3
        return cells

    rows = [row(f"p50 latency, max_tokens={mt}", "latency_p50_ms", mt, ms, lambda v: signed_ms(v["b_minus_a"]))
            for mt in first["latency_p50_ms"]]
    rows += [row(f"tok/s, concurrency {c}", "tok_s", c, num, lambda v: ratio(v["ratio"])) for c in first["tok_s"]]
    return markdown([""] + [h for b in backends for h in (f"{b} a", f"{b} b", "b − a or b/a")], rows)


def llama_cpp_batching(fig: Mapping[str, Any]) -> list[str]:
    """bench_llama_cpp_batching.py: medians, serialized llama-cpp-python vs each batched engine."""
    rows = [[f"{backend}, concurrency {c}", num(v["serialized"]), num(v["batched"]), ratio(v["ratio"])]
            for backend, data in fig["backends"].items() for c, v in data["concurrency"].items()]
    return markdown(["", "serialized tok/s", "batched engine tok/s", "batched / serialized"], rows)


TRANSFORMERS_LAYOUTS = {"slots": "KV slots + CUDA graphs + fused kernels (the CUDA default)",
                        "slots-nofuse": "KV slots + CUDA graphs, no fused kernels",
                        "dynamic-nofuse": "dynamic KV layout (eager)"}


def transformers_gpu(fig: Mapping[str, Any]) -> list[str]:
    """bench_transformers_gpu.py: plain transformers, then each engine variant at 1 and N streams."""
    n = fig["streams"]
    plain = fig.get("plain", {})
    labels = {"generate_batch1": "plain `model.generate`, batch 1",
              "generate_static": f"plain `model.generate`, static batch of {n}",
              "generate_batch": f"transformers' continuous batching (`generate_batch`), {n} streams"}
    rows = [[labels[k], tok(v) if isinstance(v, int | float) else v] for k, v in plain.items() if k in labels]
    rows += [[f"xdask engine, {TRANSFORMERS_LAYOUTS.get(layout, f'`{layout}`')}: 1 / {n} streams",
              f"{tok(v.get('1'))} / {tok(v.get(str(n)))}"] for layout, v in fig["engine"].items()]
    if "check" in fig:
        rows.append(["float32 greedy tokens, first variant = last variant (`--check`)", fig["check"]])
    return markdown(["", "tok/s"], rows)


ENGINE_NAMES = {"transformers": "transformers", "vllm": "vLLM", "mlx": "MLX"}


def engines(fig: Mapping[str, Any]) -> list[str]:
    """bench_engines.py: each engine in-process (a) and over HTTP (b)."""
    rows = [[ENGINE_NAMES.get(e, e), c, num(v["a"], 0), num(v["b"], 0), ratio(v["ratio"])]
            for e, levels in fig["engines"].items() for c, v in levels.items()]
    return markdown(["engine", "concurrency", "a: in-process tok/s", "b: xdask HTTP tok/s", "b/a"], rows)


def batch(fig: Mapping[str, Any]) -> list[str]:
    """bench_batch.py: every round, in-process vs ``chat_batch``."""
    rows = [[i, num(r["a"]), num(r["b"]), ratio(r["ratio"])] for i, r in enumerate(fig["rounds"], 1)]
    return markdown(["round", "a: in-process tok/s", "b: `chat_batch` tok/s", "b/a"], rows)


def embeddings(fig: Mapping[str, Any]) -> list[str]:
    """bench_embeddings.py: medians per case and each round's ratio."""
    rows = [[c["case"], num(c["a"], 0), num(c["b"], 0), ratio(c["ratio"]),
             " ".join(ratio(r) for r in c["round_ratios"])] for c in fig["cases"]]
    return markdown(["case", "in-process emb/s", "xdask emb/s", "xdask / in-process", "ratio per round"], rows)


def cluster(fig: Mapping[str, Any]) -> list[str]:
    """bench_cluster.py: routed over K replicas vs K one-replica models split by the client."""
    rows = [[r["replicas"], r["threads"], num(r["routed_tok_s"]), ratio(r["vs_one"]), num(r["split_tok_s"]),
             ratio(r["routed_over_split"]), ", ".join(str(x) for x in r["requests_per_replica"])]
            for r in fig.get("routing", [])]
    return markdown(["replicas", "threads / replica", "routed tok/s", "vs 1 replica", "split tok/s", "routed ÷ split",
                     "requests per replica"], rows)


def load(fig: Mapping[str, Any]) -> list[str]:
    """tests/server/test_load.py: one column per run; a cell equal to the previous run's says so."""
    def p50_p99(v: Mapping[str, float]) -> str:
        return f"{num(v['p50'], 0)} / {num(v['p99'], 0)} ms"

    def rss(v: Mapping[str, float]) -> str:
        return f"{num(v['before'])} → {num(v['after'])} MiB ({v['growth_pct']:+.1f} %)"

    lines: list[tuple[str, Callable[[Mapping[str, Any]], str], bool]] = [
        (f"{fig['clients']} streaming clients: answers",
         lambda r: f"{r['ok']} × 200 (complete, `[DONE]`), {r['rejected']} × 429", True),
        ("wall time of the wave", lambda r: f"{num(r['wave_s'])} s", False),
        ("200s: p50 / p99 latency (start to `[DONE]`)", lambda r: p50_p99(r["ok_latency_ms"]), False),
        ("429s: p50 / p99 latency", lambda r: p50_p99(r["rejected_latency_ms"]), False),
        ("server RSS before → after", lambda r: rss(r["rss_mib"]), False),
        (f"{fig['hangups']} clients hanging up: first token p50 / p99", lambda r: p50_p99(r["hangup_ttft_ms"]), False),
        ("replica `generating` back to 0 after the last hang-up", lambda r: f"{num(r['drain_s'])} s", False),
        ("server RSS before → after", lambda r: rss(r["hangup_rss_mib"]), False),
    ]
    rows = []
    for label, cell, same in lines:
        cells = [cell(r) for r in fig["runs"]]
        rows.append([label, *(("the same" if same and i and c == cells[i - 1] else c) for i, c in enumerate(cells))])
    return markdown(["", *(f"run {i}" for i in range(1, len(fig["runs"]) + 1))], rows)


#: ``benchmark`` field of a results file -> the function that renders its figures.
LAYOUTS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "llm": llm, "llama-cpp-batching": llama_cpp_batching, "transformers-gpu": transformers_gpu, "engines": engines,
    "batch": batch, "embeddings": embeddings, "cluster": cluster, "load": load,
}


# -- the caption: where the figures came from -------------------------------------------------


def when(date: str) -> str:
    """``2026-11-26T15:10:00Z`` -> ``2026-11-26 15:10 UTC``; a plain date stays as it is."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(:\d\d)?Z", date)
    return f"{m.group(1)} {m.group(2)} UTC" if m else date


def machine(facts: Mapping[str, Any]) -> str:
    """The machine in a phrase: the description a transcription gives, or the facts a run recorded."""
    if "description" in facts:
        return facts["description"]
    gpus = facts.get("gpus") or []
    gpu = ", ".join(f"{g['name']} ({num(g['memory_mib'] / 1024, 0)} GiB)" for g in gpus) if gpus else "no GPU"
    parts = [f"{facts.get('cpu', '?')}, {facts.get('cores', '?')} cores, {num(facts.get('ram_gib'))} GiB RAM, {gpu}"]
    if facts.get("load_average"):
        parts.append("load average {:.2f}, {:.2f}, {:.2f} (1, 5, 15 min) at the end".format(*facts["load_average"]))
    versions = [f"Python {facts['python']}"] + [f"{k} {v}" for k, v in (facts.get("packages") or {}).items()]
    git = facts.get("git") or {}
    if git.get("commit"):
        versions.append(f"commit {git['commit'][:10]}{' with local changes' if git.get('dirty') else ''}")
    return "; ".join(parts) + " (" + ", ".join(versions) + ")"


def caption(name: str, result: Mapping[str, Any]) -> str:
    """Where the table's figures came from: date, machine, command, source, and the run's notes."""
    source = f"a fresh run (results/{name}.json)" if result["source"] == "run" else result["source"]
    text = f"*Ran {when(result['date'])} on {machine(result['machine'])}: `{result['command']}`. Source: {source}.*"
    return " ".join([text, *result.get("notes", [])])


def render(name: str, result: Mapping[str, Any]) -> str:
    """The text between the markers of block ``name``."""
    layout = LAYOUTS.get(result["benchmark"])
    if layout is None:
        raise TableError(f"results/{name}.json: no table layout for benchmark {result['benchmark']!r} "
                         f"(known: {', '.join(LAYOUTS)})")
    lines = [f"<!-- generated by tests/benchmarks/readme_tables.py from tests/benchmarks/results/{name}.json: "
             "edit the JSON or rerun the benchmark, not this block -->",
             caption(name, result), "", *layout(result["figures"])]
    return "\n".join(lines) + "\n"


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Every results file in ``folder``, by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def rewrite(text: str, results: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(``text`` with every block regenerated, the names of results that no block shows)."""
    shown: set[str] = set()

    def fill(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in results:
            raise TableError(f"README block {name!r} has no results/{name}.json")
        shown.add(name)
        return m.group(1) + render(name, results[name]) + m.group(4)

    return BLOCK.sub(fill, text), [name for name in results if name not in shown]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    try:
        new, unshown = rewrite(text, load_results(args.results))
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in unshown:
        print(f"note: results/{name}.json is in no README block (add <!-- bench:{name}:start --> and "
              f"<!-- bench:{name}:end --> where it should go)", file=sys.stderr)
    if new == text:
        print(f"{args.readme}: benchmark tables up to date")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                   str(args.readme), "generated from results/*.json"))
        print(f"\n{args.readme} is out of date: run python tests/benchmarks/readme_tables.py", file=sys.stderr)
        return 1
    args.readme.write_text(new)
    print(f"{args.readme}: benchmark tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
