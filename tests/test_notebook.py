"""Executes notebooks/lost_anatomy.ipynb headless at its default sizes and checks its outputs."""

import math
import os
import pathlib
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import helpers
from lost_jax import configs

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
  old = {k: os.environ.get(k) for k in ("LOST_JAX_CACHE", "XLA_FLAGS")}
  os.environ["LOST_JAX_CACHE"] = str(cache)   # the kernel inherits it: tokenizer cache stays local
  # The kernel trains 60 steps: XLA's optimised code, not the suite's fast-compile flags.
  os.environ["XLA_FLAGS"] = helpers.without_fast_compile(old["XLA_FLAGS"] or "")
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  finally:
    for key, value in old.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
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


def _parameters(nb) -> dict:
  """The notebook's parameters cell (plain assignments), evaluated."""
  out = {}
  exec(_by_tag(nb, "parameters").source, {}, out)   # pylint: disable=exec-used
  return out


def expected_fractions(params: dict, k: int) -> dict:
  """The channels cell's numbers re-derived in NumPy from the same K0: the best rank-r energy
  (Eckart-Young: the top r squared singular values), the k complement rows of largest norm,
  and k random rows' expected share of the complement."""
  from lost_jax.layers.linear import init_kernel   # pylint: disable=g-import-not-at-top
  import jax   # pylint: disable=g-import-not-at-top
  k0 = np.asarray(init_kernel(jax.random.key(params["SEED"]), params["N_IN"], params["N_OUT"],
                              params["INIT"]), np.float64)
  u, s, vt = np.linalg.svd(k0, full_matrices=False)
  r = params["RANK"]
  total = np.sum(s**2)
  complement = k0 - (u[:, :r] * s[:r]) @ vt[:r]
  rows = np.sort(np.sum(complement**2, axis=1))[::-1]
  sparse = rows[:k].sum() / total
  random = k / params["N_IN"] * rows.sum() / total
  return {"truncation": np.sum(s[:r] ** 2) / total, "sparse": sparse,
          "both": np.sum(s[:r] ** 2) / total + sparse, "ratio": sparse / random}


def test_energy_fractions(executed):
  text = _text(_by_tag(executed, "channels"))
  fracs = {name: float(v) for name, v in
           re.findall(r"energy fraction (truncation|sparse|both): ([0-9.eE+-]+)", text)}
  assert set(fracs) == {"truncation", "sparse", "both"}, text
  k = int(re.search(r"\(k = (\d+) random channels", text).group(1))
  params = _parameters(executed)
  fracs["ratio"] = float(re.search(r"top-k holds ([0-9.]+)x", text).group(1))
  want = expected_fractions(params, k)   # k as the notebook printed it (lost_split's rule)
  # Printed to 4 decimals (the ratio to 2); a rank-r part that is not the top-r SVD, or kept
  # channels that are not the k largest complement rows, moves these by more.
  for name in ("truncation", "sparse", "both"):
    assert fracs[name] == pytest.approx(want[name], abs=2e-4), (name, fracs, want)
  assert fracs["ratio"] == pytest.approx(want["ratio"], abs=0.01), (fracs, want)


def test_both_runs_trained(executed):
  text = _text(_by_tag(executed, "train"))
  runs = {m: (float(loss), float(ppl)) for m, loss, ppl in re.findall(
      r"(lost|full_rank)\s*:.*final eval loss ([0-9.]+) \| eval ppl ([0-9.]+)", text)}
  assert set(runs) == {"lost", "full_rank"}, text
  vocab = configs.pretrain_config("quickstart", "lost").model.vocab_size
  for method, (loss, ppl) in runs.items():
    # The perplexity is exp of the loss (to print precision) ...
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3), (method, loss, ppl)
    # ... and the loss is at least 1 nat below a uniform guess over the vocabulary, where
    # an untrained model starts: a step that did not train would fail this.
    assert loss < math.log(vocab) - 1.0, (method, loss)
