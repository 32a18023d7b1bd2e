"""The walkthrough notebook runs top to bottom (tiny settings), so it cannot rot."""

import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parent.parent / "examples" / "averaging_walkthrough.ipynb"
EPOCHS = 2


def outputs_of(cell: nbformat.NotebookNode, kind: str) -> str:
    """The text of a cell's outputs of one MIME type (or stream name) joined together."""
    texts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == kind:
            texts.append(output.text)
        elif kind in output.get("data", {}):
            texts.append(str(output.data[kind]))
    return "".join(texts)


def test_notebook_runs_and_compares_last_iterate_with_the_ema(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    parameters.source = f"EPOCHS = {EPOCHS}\nBATCHES_PER_EPOCH = 5\nSEED = 0"
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    scores = next(cell for cell in code_cells if 'pd.DataFrame({"last iterate"' in cell.source)
    table = outputs_of(scores, "text/plain")
    assert "last iterate" in table and "EMA (decay 0.999)" in table and "MASE" in table
    # one log line per epoch from the plugin, raw against averaged validation loss
    logged = "".join(outputs_of(cell, "stderr") for cell in code_cells)
    assert logged.count("with the raw weights") == EPOCHS
    figures = sum(outputs_of(cell, "image/png") != "" for cell in code_cells)
    assert figures == 2
