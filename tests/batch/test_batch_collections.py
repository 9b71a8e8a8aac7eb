"""``xdask.batch.map_chat`` / ``map_generate`` on dask dataframes and bags, and resumable ``to_parquet``.

Real server, real model: the session's ``xdask-local`` and Gemma 3 270M.
The resume test kills (SIGKILL) a process that is writing answers to
parquet, then runs it again and checks from the model's own request counter
that no partition was computed twice.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

dd = pytest.importorskip("dask.dataframe", reason="the batch extra (pandas, pyarrow) is not installed")
# These imports need the batch extra, so they come after the importorskip above on purpose.
import dask.bag as db  # noqa: E402
import pandas as pd  # noqa: E402

from xdask import Client  # noqa: E402
from xdask.batch import map_chat, map_generate  # noqa: E402
from xdask.errors import InvalidRequestError  # noqa: E402

pytestmark = pytest.mark.slow

# Writes 8 partitions x 12 rows of answers to parquet; run twice with the same arguments, it must resume.
WRITER = """
import sys
import dask.dataframe as dd
import pandas as pd
from xdask import Client
from xdask.batch import map_chat, to_parquet

endpoint, uid, path = sys.argv[1:4]
client = Client(endpoint)
client.dask_client()  # Dask's default client from here on (keep a reference to it)
prompts = pd.DataFrame({"prompt": [f"Say{' la' * (i % 10)} {i}" for i in range(96)]})
ddf = dd.from_pandas(prompts, npartitions=8)
assert ddf.npartitions == 8
answers = map_chat(ddf["prompt"], uid, with_errors=True, max_tokens=6, temperature=0)
print("RESULT", to_parquet(answers, path), flush=True)
"""


@pytest.fixture(scope="module")
def xclient(server) -> Iterator[Client]:
    with Client(server.endpoint) as client:
        client.dask_client()  # becomes Dask's default: .compute() runs on xdask's cluster
        yield client


def _engine(http: httpx.Client, uid: str) -> dict:
    (rep,) = http.get(f"/v1/models/{uid}").json()["replicas"]
    return rep["engine"]


def test_map_chat_on_a_series(xclient: Client, default_model: str) -> None:
    prompts = pd.Series([f"Say{' la' * i}" for i in range(10)], index=range(100, 110), name="prompt")
    col = dd.from_pandas(prompts, npartitions=3)
    answers = map_chat(col, default_model, max_tokens=3, temperature=0, system="Answer briefly.")
    assert answers.name == "answer" and str(answers.dtype) == "string"  # lazy, typed
    got = answers.compute()
    assert list(got.index) == list(range(100, 110)) and got.notna().all() and str(got.dtype) == "string"
    # The same prompts with the row facts; a named result joins back onto its frame.
    frame = map_generate(col, default_model, with_errors=True, max_tokens=3, name="ignored").compute()
    assert list(frame.columns) == ["answer", "error", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert frame["error"].isna().all() and (frame["completion_tokens"] <= 3).all()
    assert frame["prompt_tokens"].is_monotonic_increasing  # each row's answer is its own prompt's
    df = dd.from_pandas(pd.DataFrame({"q": ["Say la", "Say la la"]}), npartitions=1)
    df["a"] = map_chat(df["q"], default_model, max_tokens=2, name="a")
    assert df.compute()["a"].notna().all()


def test_a_failed_row_is_recorded_and_the_rest_complete(xclient: Client, default_model: str) -> None:
    # A prompt longer than a slot's context fails in the engine; its neighbours do not.
    too_long = "la " * 5000
    col = dd.from_pandas(pd.Series(["Say la", too_long, "Say la la"]), npartitions=1)
    frame = map_chat(col, default_model, with_errors=True, max_tokens=2).compute()
    assert frame["answer"].isna().tolist() == [False, True, False]
    assert frame["error"].isna().tolist() == [True, False, True] and frame["error"][1]
    plain = map_chat(col, default_model, max_tokens=2).compute()
    assert plain.isna().tolist() == [False, True, False]
    # Bags take message lists too; a malformed one is an error row.
    bag = db.from_sequence(["Say la", [{"role": "user", "content": "Say la"}], [{"role": "robot"}]], npartitions=2)
    rows = map_chat(bag, default_model, with_errors=True, max_tokens=2).compute()
    assert [r["error"] is None for r in rows] == [True, True, False] and "role" in rows[2]["error"]
    assert map_generate(db.from_sequence(["1, 2, 3,"]), default_model, max_tokens=2).compute()[0]
    with pytest.raises(InvalidRequestError, match="temperature"):  # a bad parameter fails now, not per row
        map_chat(col, default_model, temperature=9)
    with pytest.raises(TypeError, match="dask Series"):
        map_chat(dd.from_pandas(pd.DataFrame({"q": ["x"]}), npartitions=1), default_model)


def test_to_parquet_resumes_after_a_kill(server, http: httpx.Client, default_model: str, tmp_path: Path) -> None:
    out = tmp_path / "answers"
    argv = [sys.executable, "-c", WRITER, server.endpoint, default_model, str(out)]

    def parts() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in out.glob("part.*.parquet")} if out.exists() else {}

    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not parts() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()  # SIGKILL: no cleanup of any kind
    finally:
        first.wait()
    written = parts()
    assert 0 < len(written) < 8, (written, first.stdout.read() if first.stdout else "")
    # Work already at the model when the run died finishes there; wait for it, then count.
    quiet_since = time.monotonic()
    deadline = quiet_since + 120
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 2:
        if _engine(http, default_model)["in_flight"]:
            quiet_since = time.monotonic()
        time.sleep(0.1)
    written = parts()
    assert len(written) < 8
    before = _engine(http, default_model)["requests_total"]

    again = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    after = _engine(http, default_model)["requests_total"]
    missing = [i for i in range(8) if f"part.{i}.parquet" not in written]
    result = ast.literal_eval(again.stdout.split("RESULT", 1)[1].strip())  # the printed dict
    print(f"\nfirst run wrote {len(written)} of 8 partitions before SIGKILL; rerun {result}; "
          f"model requests in the rerun: {after - before}")
    assert result == {"written": missing, "skipped": sorted(set(range(8)) - set(missing))}
    assert after - before == 12 * len(missing)  # only the missing partitions reached the model
    now = parts()
    assert sorted(now) == sorted(f"part.{i}.parquet" for i in range(8))
    assert all(now[name] == mtime for name, mtime in written.items())  # the first run's files untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(now)  # no temporary files left
    frame = dd.read_parquet(out).compute()
    assert list(frame.index) == list(range(96))
    assert frame["answer"].notna().all() and frame["error"].isna().all()
