"""The example notebook runs as a user runs it: executed top to bottom in a fresh Jupyter kernel
(nbclient), with no error, ending with the certified-accuracy table of the model it trained."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "python_api.ipynb"


@pytest.mark.slow  # a Jupyter kernel; about 15 s
def test_the_example_notebook_runs_and_certifies(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    texts = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    table = next(t for t in texts if "notebook" in t and "ACR" in t)
    row = dict(zip(table.split("\n")[0].split(), table.split("\n")[1].split()[1:]))
    assert float(row["0.00"]) > 0.8 and int(row["images"]) == 60  # every 6th of 360 test digits
    assert (tmp_path / "certified_accuracy.png").is_file()
