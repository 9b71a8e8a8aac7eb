"""Every notebook in ``notebooks/`` runs top to bottom with a real kernel against a real server.

nbclient starts an ipykernel process; the kernel reaches the session's
``xdask-local`` through ``XDASK_ENDPOINT``. A cell that raises fails the test
with the cell's source and traceback.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_UIDS = {"quickstart", "batch", "tour", "batchnb"}  # the model uids the notebooks launch
NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_quickstart", "02_batch_futures", "03_cluster_and_dashboard"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, server, default_model: str, monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    monkeypatch.setenv("XDASK_ENDPOINT", server.endpoint)
    monkeypatch.setenv("XDASK_HOME", server.env["XDASK_HOME"])
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed\n{exc}")
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # The notebook stops what it launched.
    running = {m["id"] for m in httpx.get(f"{server.endpoint}/v1/models", timeout=30).json()["data"]}
    assert not running & NOTEBOOK_UIDS, running
