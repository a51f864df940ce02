"""Executes notebooks/lost_anatomy.ipynb headless at its default sizes and checks its outputs."""

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "lost_anatomy.ipynb"
# Cells (by tag) that must each show a figure.
FIGURE_CELLS = ("spectrum", "channels", "curves")
pytestmark = pytest.mark.slow      # a kernel that trains two small runs


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _by_tag(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  cache = tmp_path_factory.mktemp("lost_jax_cache")
  old = os.environ.get("LOST_JAX_CACHE")
  os.environ["LOST_JAX_CACHE"] = str(cache)   # the kernel inherits it: tokenizer cache stays local
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  finally:
    if old is None:
      os.environ.pop("LOST_JAX_CACHE")
    else:
      os.environ["LOST_JAX_CACHE"] = old
  return nb


def test_no_cell_errored(executed):
  for cell in executed.cells:
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.output_type == "error"]
      assert not errors, f"cell failed:\n{cell.source[:200]}\n{errors[0].get('evalue')}"


def test_figures_are_shown(executed):
  for tag in FIGURE_CELLS:
    pngs = [o for o in _by_tag(executed, tag).outputs
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(pngs) == 1, f"cell {tag!r} should show one PNG, got {len(pngs)}"
    assert len(pngs[0]["data"]["image/png"]) > 1000


def test_energy_fractions(executed):
  text = _text(_by_tag(executed, "channels"))
  fracs = {name: float(v) for name, v in
           re.findall(r"energy fraction (truncation|sparse|both): ([0-9.eE+-]+)", text)}
  assert set(fracs) == {"truncation", "sparse", "both"}, text
  for name, value in fracs.items():
    assert 0.0 < value <= 1.0, (name, value)
  # Orthogonal SVD subspaces: the captured energies add up (to print precision).
  assert abs(fracs["both"] - fracs["truncation"] - fracs["sparse"]) < 2e-4
  # The top 128 of 512 singular values hold more than an equal share (128/512) of the energy.
  assert fracs["truncation"] > 128 / 512
  # Top-k channels hold more complement energy than k random channels would on average.
  ratio = float(re.search(r"top-k holds ([0-9.]+)x", text).group(1))
  assert ratio > 1.0


def test_both_runs_trained(executed):
  text = _text(_by_tag(executed, "train"))
  ppl = dict(re.findall(r"(lost|full_rank)\s*:.*eval ppl ([0-9.]+)", text))
  assert set(ppl) == {"lost", "full_rank"}, text
  for value in ppl.values():
    # Below a uniform guess over the 4096-token vocabulary: both models learned something.
    assert 1.0 < float(value) < 4096.0
