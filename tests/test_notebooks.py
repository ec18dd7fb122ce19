"Every tutorial notebook runs top to bottom (in fast mode: a few rows, short sequences)."

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).resolve().parents[1] / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NBS, ids=[p.name for p in NBS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("ULMFIT_TX_FAST", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
