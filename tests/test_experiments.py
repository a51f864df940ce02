"""experiments/compare_methods.py and ablate_lost.py on a tiny model for a few steps."""

import json
import math
import re

import pytest

from experiments import ablate_lost, common, compare_methods
from lost_jax import metrics

TINY = {"model.d_model": 32, "model.ffn_dim": 64, "model.n_layers": 1, "model.n_heads": 2,
        "model.n_kv_heads": 2, "model.linear.rank": 4, "data.seq_len": 16,
        "train.batch_size": 2, "train.steps": 3, "train.eval_every": 2,
        "train.eval_batches": 1, "train.log_every": 1, "train.precision": "float32"}


def _projection_params(model, kind, rank, sparsity=0.01, density=0.03):
  """Independent count: sum over q/k/v/o/gate/up/down of one block, per LOST.md."""
  d, f = model.d_model, model.ffn_dim
  shapes = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
  total = 0
  for n, m in shapes:
    total += rank * (n + m)
    if kind == "lost":
      total += max(1, math.ceil(sparsity * n)) * m
    if kind == "sltrain":
      total += round(density * n * m)
  return total


@pytest.mark.parametrize("kind", ["low_rank", "cola", "sltrain"])
def test_baseline_rank_matches_lost_on_the_overridden_shape(kind):
  cfg = common.method_config("quickstart", kind, {"model.d_model": 256, "model.ffn_dim": 688,
                                                  "model.linear.rank": 64})
  lost = _projection_params(cfg.model, "lost", 64)
  r = cfg.model.linear.rank
  here = _projection_params(cfg.model, kind, r)
  step = _projection_params(cfg.model, kind, r + 1) - here   # params of one more rank
  assert abs(here - lost) <= step / 2
  # The preset's rank was matched for d_model 128 and LOST rank 32: it must have changed.
  assert r != common.configs.pretrain_config("quickstart", kind).model.linear.rank


def test_galore_rank_follows_lost_and_per_method_override_wins():
  cfg = common.method_config("quickstart", "galore", {"model.linear.rank": 16},
                             {"train.lr": "4e-3", "train.galore_update_freq": "7"})
  assert cfg.train.galore_rank == 16
  assert cfg.train.lr == pytest.approx(4e-3) and cfg.train.galore_update_freq == 7
  assert isinstance(cfg.train.galore_update_freq, int)
  kept = common.method_config("quickstart", "galore", {"model.linear.rank": 16,
                                                       "train.galore_rank": 8})
  assert kept.train.galore_rank == 8


def test_parse_method_overrides():
  got = common.parse_method_overrides(["galore:train.lr=4e-3", "lost:model.linear.gamma=0.5",
                                       "galore:train.b2=0.95"], ["lost", "galore"])
  assert got == {"galore": {"train.lr": "4e-3", "train.b2": "0.95"},
                 "lost": {"model.linear.gamma": "0.5"}}
  with pytest.raises(ValueError, match="not run"):
    common.parse_method_overrides(["cola:train.lr=1"], ["lost"])
  with pytest.raises(ValueError, match="method:key=value"):
    common.parse_method_overrides(["train.lr=1"], ["lost"])
  with pytest.raises(ValueError, match="no field"):
    common.method_config("quickstart", "lost", None, {"train.nope": "1"})
  assert common.parse_value(True, "false") is False


def _table_rows(md: str) -> dict[str, list[str]]:
  rows = {}
  for line in md.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if line.startswith("|") and not set(cells[0]) <= {"-"}:
      rows[cells[0]] = cells
  return rows


def test_compare_methods_writes_report_and_resumes(tmp_path):
  kw = dict(name="t", workdir_root=str(tmp_path / "runs"), overrides=TINY,
            out_dir=str(tmp_path / "out"), command="python experiments/compare_methods.py x",
            log=lambda _: None)
  rows = compare_methods.run("quickstart", ["full_rank", "lost"], **kw)
  md = (tmp_path / "out" / "t.md").read_text()
  assert (tmp_path / "out" / "t.png").stat().st_size > 0
  table = _table_rows(md)
  for r in rows:
    assert r["steps"] == 3 and r["memory_xla"] > r["memory_argument"] > 0
    assert table[r["method"]][5] == f"**{r['eval_ppl']:.2f}**"
    # The final perplexity is the eval at the last step of the run's own metrics.
    last = [m for m in metrics.read_metrics(r["workdir"]) if "eval_ppl" in m][-1]
    assert last["step"] == 3 and last["eval_ppl"] == r["eval_ppl"]
  best, worst = sorted(rows, key=lambda r: r["eval_ppl"])
  assert re.search(rf"1\. {best['method']} .*2\. {worst['method']}", md)
  assert "python experiments/compare_methods.py x" in md
  assert json.loads((tmp_path / "out" / "t.json").read_text())[1]["method"] == "lost"

  # Re-running reuses finished runs: nothing is trained or appended again.
  lines = len(metrics.read_metrics(rows[1]["workdir"]))
  again = compare_methods.run("quickstart", ["full_rank", "lost"], **kw)
  assert [r["eval_ppl"] for r in again] == [r["eval_ppl"] for r in rows]
  assert len(metrics.read_metrics(rows[1]["workdir"])) == lines
  # A different config in the same workdir is refused, not mixed in.
  with pytest.raises(ValueError, match="different config"):
    compare_methods.run("quickstart", ["lost"], **{**kw, "overrides": {**TINY,
                                                                        "train.steps": 4}})


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_ablation_variants_change_only_their_fields():
  ref = _flat(ablate_lost.variant_config("quickstart", "lost", TINY).to_dict())
  for variant, (method, fields, _) in ablate_lost.ABLATIONS.items():
    cfg = ablate_lost.variant_config("quickstart", variant, TINY)
    if method != "lost":
      assert cfg.model.linear.kind == method
      continue
    flat = _flat(cfg.to_dict())
    assert {k for k in flat if flat[k] != ref[k] and k != "name"} == set(fields)


def test_ablate_lost_runs_and_reports_gaps(tmp_path):
  rows = ablate_lost.run("quickstart", ["lost", "gamma=0.5"], name="a",
                         workdir_root=str(tmp_path / "runs"), overrides=TINY,
                         out_dir=str(tmp_path / "out"), log=lambda _: None)
  assert rows[1]["config"]["model"]["linear"]["gamma"] == 0.5
  md = (tmp_path / "out" / "a.md").read_text()
  table = _table_rows(md)
  gap = 100 * (rows[1]["eval_ppl"] / rows[0]["eval_ppl"] - 1)
  assert table["gamma=0.5"][6] == f"{gap:+.1f}%" and table["lost"][6] == "+0.0%"
  assert (tmp_path / "out" / "a.png").stat().st_size > 0
