"""experiments/compare_methods.py and ablate_lost.py on a tiny model for a few steps."""

import json
import math

import pytest

from experiments import ablate_lost, common, compare_methods, compare_protocol, compare_report, runs
from lost_jax import configs
from lost_jax.recipes import pretrain
from lost_jax.training import metrics

TINY = {"model.d_model": 32, "model.ffn_dim": 64, "model.n_layers": 1, "model.n_heads": 2,
        "model.n_kv_heads": 2, "model.linear.rank": 4, "data.seq_len": 16,
        "train.batch_size": 2, "train.steps": 3, "train.eval_every": 2,
        "train.eval_batches": 1, "train.log_every": 1, "train.precision": "float32"}
TINY_PROTO = compare_protocol.Protocol(
    size="quickstart",
    overrides=tuple({**TINY, "train.shared_lr": 2.5e-3, "train.galore_update_freq": 2,
                     "train.eval_tokens": 0, "train.ckpt_every": 100}.items()),
    sweep_steps=3, final_steps=6, seeds=(0, 1, 2), eval_every=((3, 2), (6, 3)), label="tiny")


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


def test_galore_rank_follows_lost_unless_overridden():
  cfg = common.method_config("quickstart", "galore", {"model.linear.rank": 16})
  assert cfg.train.galore_rank == 16
  kept = common.method_config("quickstart", "galore", {"model.linear.rank": 16,
                                                       "train.galore_rank": 8})
  assert kept.train.galore_rank == 8


@pytest.mark.parametrize("size, lr, gap, rank", [("llama_60m", 1e-2, 200, 128),
                                                 ("llama_1b", 1e-2, 200, 1024),
                                                 ("llama_7b", 5e-3, 500, 1024)])
def test_galore_preset_follows_its_published_recipe(size, lr, gap, rank):
  t = configs.pretrain_config(size, "galore").train
  assert (t.lr, t.galore_scale, t.galore_update_freq, t.galore_rank) == (lr, 0.25, gap, rank)
  assert t.shared_lr == 0.0   # the recipe trains unprojected parameters at the same lr


def test_llama_7b_40k_is_the_7b_model_at_40k_steps():
  short, full = (configs.pretrain_config(s, "lost") for s in ("llama_7b_40k", "llama_7b"))
  assert short.train.steps == 40_000 and full.train.steps == 150_000
  assert short.model.to_dict() == full.model.to_dict()
  assert short.name == "llama_7b_40k,lost"


# ------------------------------------------------------------------------ cached runs
def _fake_result(cfg, version):
  return {"config": runs.keyed_config(cfg), "code_version": version, "eval_ppl": 1.0}


def test_cache_refuses_a_result_of_other_code_or_config(tmp_path):
  cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -2, 0, 3))
  version = runs.code_version()
  key = runs.result_key(cfg, version)
  runs.write_json(str(tmp_path / f"{key}.json"), _fake_result(cfg, version))
  assert runs.load_result(str(tmp_path), cfg, version)["eval_ppl"] == 1.0
  # The name is a label, not a setting: same key.
  renamed = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -2, 0, 3))
  renamed.name = "other"
  assert runs.result_key(renamed, version) == key
  # Other code or another config: a different key, so nothing is found ...
  other_code = dict(version, sources="0" * 16)
  other_cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -1, 0, 3))
  assert runs.result_key(cfg, other_code) != key
  assert runs.load_result(str(tmp_path), cfg, other_code) is None
  assert runs.load_result(str(tmp_path), other_cfg, version) is None
  # ... and a file under the asked key that other code or another config made is refused.
  for made_by in [_fake_result(cfg, other_code), _fake_result(other_cfg, version)]:
    runs.write_json(str(tmp_path / f"{key}.json"), made_by)
    with pytest.raises(ValueError, match="different code or a different config"):
      runs.load_result(str(tmp_path), cfg, version)


def test_sources_hash_covers_package_and_runner(tmp_path):
  for rel in ["lost_jax/a.py", "lost_jax/sub/b.py", "experiments/runs.py",
              "experiments/report.py", "lost_jax/notes.txt"]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(rel)
  assert runs.source_files(str(tmp_path)) == ["experiments/runs.py", "lost_jax/a.py",
                                              "lost_jax/sub/b.py"]
  before = runs.sources_hash(str(tmp_path))
  (tmp_path / "experiments/report.py").write_text("changed")   # not hashed: reads results
  assert runs.sources_hash(str(tmp_path)) == before
  (tmp_path / "lost_jax/sub/b.py").write_text("changed")
  assert runs.sources_hash(str(tmp_path)) != before
  assert set(runs.code_version()) >= {"sources", "python", "jax", "flax", "optax"}


@pytest.mark.slow
def test_run_trains_once_and_again_under_other_code(tmp_path, monkeypatch):
  cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -2, 0, 3))
  kw = dict(results_dir=str(tmp_path / "res"))
  first = runs.run(cfg, str(tmp_path / "work"), **kw)
  assert first["steps"] == 3 and [s for s, _, _ in first["eval_curve"]] == [2, 3]
  workdir = tmp_path / "work" / first["key"]
  last = [m for m in metrics.read_metrics(str(workdir)) if "eval_ppl" in m][-1]
  assert last["step"] == 3 and last["eval_ppl"] == first["eval_ppl"]
  lines = len(metrics.read_metrics(str(workdir)))
  assert runs.run(cfg, str(tmp_path / "work"), **kw) == first     # reused, nothing trained
  assert len(metrics.read_metrics(str(workdir))) == lines
  monkeypatch.setattr(runs, "code_version", lambda: dict(first["code_version"], sources="x"))
  again = runs.run(cfg, str(tmp_path / "work"), **kw)
  assert again["key"] != first["key"] and (tmp_path / "work" / again["key"]).is_dir()
  assert len(list((tmp_path / "res").glob("*.json"))) == 2


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_is_no_result_and_resumes(tmp_path, monkeypatch):
  cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -2, 0, 3))
  kw = dict(results_dir=str(tmp_path / "res"))
  whole = pretrain.train_and_evaluate
  monkeypatch.setattr(pretrain, "train_and_evaluate",   # SIGTERM after step 2
                      lambda c, w, quiet: whole(c, w, quiet=quiet, stop_at=2))
  with pytest.raises(runs.Interrupted, match="stopped at step 2 of 3"):
    runs.run(cfg, str(tmp_path / "work"), **kw)
  assert not list((tmp_path / "res").glob("*.json"))
  monkeypatch.setattr(pretrain, "train_and_evaluate", whole)
  result = runs.run(cfg, str(tmp_path / "work"), **kw)
  steps = [m["step"] for m in metrics.read_metrics(str(tmp_path / "work" / result["key"]))
           if "loss" in m]
  assert result["steps"] == 3 and steps.count(1) == 1 and steps[-1] == 3   # resumed at 2


# ------------------------------------------------------------------------ the sweep plan
def _lookup(optimum: dict[str, int]):
  """A fake store: perplexity (i - optimum)^2 + 10 + 0.01 seed + 0.5 |shared shift| once
  `finish`ed."""
  done = {}

  def finish(specs):
    for s in specs:
      done[s] = {"eval_ppl": (s.lr_index - optimum[s.entry]) ** 2 + 10.0 + 0.01 * s.seed
                 + 0.5 * abs(s.shared_shift)}
  return done.get, finish, done


def _run_sweep_of(entry, get, finish):
  for _ in range(12):
    _, todo, _ = compare_protocol.sweep_state(TINY_PROTO, entry, get)
    finish([compare_protocol.Spec(entry, i, 0, TINY_PROTO.sweep_steps) for i in todo])
  return compare_protocol.sweep_state(TINY_PROTO, entry, get)


def test_sweep_brackets_the_optimum_extending_past_an_edge():
  get, finish, _ = _lookup({"full_rank": -7, "lost": -1})
  grid, todo, best = compare_protocol.sweep_state(TINY_PROTO, "full_rank", get)
  assert grid == todo == [-5, -4, -3, -2] and best is None
  grid, todo, best = _run_sweep_of("full_rank", get, finish)
  assert grid == [-8, -7, -6, -5, -4, -3, -2] and best == -7 and not todo   # bracketed
  # An optimum further away stops after MAX_EXTENSIONS, at the edge.
  get, finish, _ = _lookup({"full_rank": -20, "lost": -1})
  grid, _, best = _run_sweep_of("full_rank", get, finish)
  assert len(grid) == 4 + compare_protocol.MAX_EXTENSIONS and best == grid[0] == -8
  # A diverged run (NaN) counts as the worst, not as a number.
  get, finish, done = _lookup({"full_rank": -2, "lost": -1})
  grid, _, best = _run_sweep_of("full_rank", get, finish)
  assert best == -2 and grid[-1] == -1
  done[compare_protocol.Spec("full_rank", -2, 0, TINY_PROTO.sweep_steps)] = {
      "eval_ppl": float("nan")}
  # -3 and -1 tie at 11: the lower rate wins the tie.
  assert compare_protocol.sweep_state(TINY_PROTO, "full_rank", get)[2] == -3


def test_plan_order_first_pair_then_controls_around_lost_then_seeds():
  optimum = {e: -2 for e in compare_protocol.ENTRIES}
  optimum["full_rank"] = -3    # inside its grid
  optimum["lost"] = 0          # at LOST's grid edge: one extension to 1
  get, finish, done = _lookup(optimum)
  stages = []
  while True:
    todo = compare_protocol.plan(TINY_PROTO, get)
    if not todo:
      break
    stages.append(todo)
    finish(todo)
  sweep, final = TINY_PROTO.sweep_steps, TINY_PROTO.final_steps
  assert {s.entry for s in stages[0]} == {"full_rank", "lost"}
  assert [s.entry for s in stages[0][:4]] == ["full_rank", "lost"] * 2    # interleaved
  assert all(s.steps == sweep and s.seed == 0 for s in stages[0])
  assert stages[1] == [compare_protocol.Spec("lost", 1, 0, sweep)]         # the extension
  assert stages[2] == [compare_protocol.Spec("full_rank", -3, s, final) for s in (0, 1, 2)] + [
      compare_protocol.Spec("lost", 0, s, final) for s in (0, 1, 2)]
  controls = {s.lr_index for s in stages[3] if s.entry == "lost_gamma1"}
  assert controls == {-1, 0, 1}                                          # around LOST's 0
  assert all(s.steps == final for s in stages[-3]) and all(
      s.steps == sweep and s.seed in (1, 2) for s in stages[-2])
  assert stages[-1] == [compare_protocol.Spec("full_rank", -3, 0, sweep, k) for k in (-1, 1)] + [
      compare_protocol.Spec("lost", 0, 0, sweep, k) for k in (-1, 1)]
  shared = [compare_protocol.spec_config(TINY_PROTO, s).train.shared_lr for s in stages[-1]]
  assert shared == [1.25e-3, 5e-3] * 2
  n_grid = {e: len(compare_protocol.sweep_state(TINY_PROTO, e, get)[0])
            for e in compare_protocol.ENTRIES}
  assert all(n >= 4 for e, n in n_grid.items() if e in ("full_rank", "lost", "cola"))
  assert all(n >= 3 for n in n_grid.values())
  assert len(done) == sum(n_grid.values()) + len(compare_protocol.ENTRIES) * 5 + 4


def _table_rows(md: str) -> dict[str, list[str]]:
  rows = {}
  for line in md.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if line.startswith("|") and not set(cells[0]) <= {"-"}:
      rows.setdefault(cells[0], cells)   # first table wins
  return rows


def test_report_spreads_and_ranking(tmp_path):
  get, finish, _ = _lookup({e: -2 for e in compare_protocol.ENTRIES})

  def full(spec):
    r = get(spec)
    if r is None:
      return None
    return dict(r, params={"trainable": 1e6, "projections": 5e5}, tokens_per_s=100.0,
                seed=spec.seed, eval_curve=[[1, 0.0, 20.0], [3, 0.0, r["eval_ppl"]]])
  while True:
    todo = compare_protocol.plan(TINY_PROTO, get)
    if not todo:
      break
    finish(todo)
  md = compare_report.write_report(TINY_PROTO, full, name="r", out_dir=str(tmp_path),
                                   command="cmd")
  budget = md[md.index("## 192 tokens"):]    # the tiny final budget: 6 steps x 2 x 16
  rows = _table_rows(budget)
  # seeds 0, 1, 2 give 10.00, 10.01, 10.02: mean 10.01, sample std 0.01
  assert rows["lost"][3] == "**10.01 ± 0.01**" and rows["lost"][4] == "10.00 – 10.02"
  assert "pending" not in md and "Ranking of the methods with all seeds finished" in md
  assert ("lost_gamma1 10.01 ± 0.01 (n=3) vs LOST 10.01 ± 0.01 (n=3), +0.0%, ranges "
          "overlap") in md
  assert _table_rows(md)["full_rank"][-1] == "0.0025"    # the chosen rate, 1e-2 x 2^-2
  shared = _table_rows(md[md.index("## Shared learning-rate check"):])
  assert shared["lost"][1:] == ["10.50", "**10.00**", "10.50"]
  assert (tmp_path / "r_6steps.png").stat().st_size > 0


@pytest.mark.slow
def test_sweep_resumes_and_reports_pending(tmp_path):
  kw = dict(name="t", results_dir=str(tmp_path / "res"), workdir_root=str(tmp_path / "w"),
            out_dir=str(tmp_path / "out"), command="python -m experiments.compare_methods x",
            log=lambda _: None)
  assert compare_methods.sweep(TINY_PROTO, max_runs=2, **kw) == 2
  md = (tmp_path / "out" / "t.md").read_text()
  assert "python -m experiments.compare_methods x" in md and "pending" in md
  assert (tmp_path / "out" / "t_sweep.png").stat().st_size > 0
  stored = [json.loads(f.read_text()) for f in (tmp_path / "res").glob("*.json")]
  assert sorted(r["name"] for r in stored) == ["tiny,full_rank", "tiny,lost"]
  table = _table_rows(md)
  for r in stored:
    assert f"{r['eval_ppl']:.2f}" in table[r["name"].split(",")[1]]
  assert not list((tmp_path / "w").glob("*/checkpoints"))     # finished runs keep no state
  # Resuming trains the next run of the plan, not the finished ones again.
  assert compare_methods.sweep(TINY_PROTO, max_runs=1, **kw) == 1
  assert len(list((tmp_path / "res").glob("*.json"))) == 3


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_ablation_variants_change_only_their_fields():
  ref = _flat(ablate_lost.variant_config(TINY_PROTO, "lost", 1e-3, 0).to_dict())
  assert ref["train.lr"] == 1e-3 and ref["train.shared_lr"] == 2.5e-3
  for variant, (fields, _) in ablate_lost.ABLATIONS.items():
    flat = _flat(ablate_lost.variant_config(TINY_PROTO, variant, 1e-3, 0).to_dict())
    assert {k for k in flat if flat[k] != ref[k] and k != "name"} == set(fields)
  # gamma=1 at LOST's rate is the comparison's control run: the same key, trained once.
  version = runs.code_version()
  control = compare_protocol.spec_config(
      TINY_PROTO, compare_protocol.Spec("lost_gamma1", -2, 0, TINY_PROTO.sweep_steps))
  assert runs.result_key(ablate_lost.variant_config(TINY_PROTO, "gamma=1", 2.5e-3, 0),
                         version) == runs.result_key(control, version)


@pytest.mark.slow
def test_ablate_lost_runs_seeds_and_reports_gaps(tmp_path):
  out = ablate_lost.run(TINY_PROTO, ["lost", "gamma=0.5"], lr=3e-3, name="a", seeds=[0, 1],
                        results_dir=str(tmp_path / "res"), workdir_root=str(tmp_path / "w"),
                        out_dir=str(tmp_path / "out"), log=lambda _: None)
  assert [r["seed"] for r in out["gamma=0.5"]] == [0, 1]
  assert out["gamma=0.5"][0]["config"]["model"]["linear"]["gamma"] == 0.5
  table = _table_rows((tmp_path / "out" / "a.md").read_text())
  mean = lambda v: sum(r["eval_ppl"] for r in out[v]) / 2
  assert table["gamma=0.5"][5] == f"{100 * (mean('gamma=0.5') / mean('lost') - 1):+.1f}%"
  assert table["lost"][5] == "+0.0%" and table["gamma=0.9"][3] == "pending"
  ppl = {v: [r["eval_ppl"] for r in out[v]] for v in out}
  apart = max(ppl["gamma=0.5"]) < min(ppl["lost"]) or max(ppl["lost"]) < min(ppl["gamma=0.5"])
  assert table["gamma=0.5"][6] == ("apart" if apart else "overlap") and table["lost"][6] == ""


def test_shared_check_extends_past_an_edge_and_reports_the_gap_at_each_best():
  get, finish, done = _lookup({e: -2 for e in compare_protocol.ENTRIES})
  for _ in range(40):
    todo = compare_protocol.plan(TINY_PROTO, get)
    if not todo:
      break
    finish(todo)
    for s in todo:      # the shared check: full_rank improves up to shift 2, LOST without end
      if s.shared_shift:  # (shift 0 is the sweep's run at the chosen rate: 10.00)
        done[s]["eval_ppl"] = (8.0 + 0.5 * (s.shared_shift - 2) ** 2 if s.entry == "full_rank"
                               else 10.0 - s.shared_shift)
  assert not todo
  grid, _, best = compare_protocol.shared_state(TINY_PROTO, "full_rank", get)
  assert grid == [-1, 0, 1, 2, 3] and best == 2          # 2 extensions, then bracketed
  grid, _, best = compare_protocol.shared_state(TINY_PROTO, "lost", get)
  assert grid == [-1, 0, 1, 2, 3, 4] and best == 4       # MAX_EXTENSIONS reached at an edge
  text = compare_report.shared_table(TINY_PROTO, get)
  rows = _table_rows(text)
  assert rows["full_rank"][1:] == ["12.50", "10.00", "8.50", "**8.00**", "8.50", ""]
  assert rows["lost"][1:] == ["11.00", "10.00", "9.00", "8.00", "7.00", "**6.00**"]
  assert ("full_rank 0.01 (8.00), LOST 0.04 (6.00) (at the edge of the searched range: not "
          "bracketed). LOST vs full_rank (seed 0): -25.0% with each at its best shared lr, "
          "+0.0% at the protocol's 0.0025.") in text


def test_settled_text_names_flipped_pairs_and_separated_neighbours():
  rows = lambda ppl: {e: {"results": [{"eval_ppl": p} for p in ps]} for e, ps in ppl.items()}
  short = rows({"full_rank": [20, 21, 22], "lost": [23, 24, 25], "cola": [30, 31, 32],
                "galore": [40, 41, 42], "sltrain": [50, 51]})              # sltrain: 2 of 3
  long_ = rows({"full_rank": [12, 13, 14], "lost": [10, 11, 12], "cola": [15, 16, 17],
                "galore": [16.5, 18, 19], "sltrain": [20, 21, 22]})
  text = compare_report.settled_text(TINY_PROTO, {3: short, 6: long_})
  assert "Among the 4 entries" in text and "1 pair(s) change order" in text
  assert "full_rank ahead of lost at 96 tokens (21.00 ± 1.00 vs 24.00 ± 1.00, ranges apart)" in text
  assert "behind at 192 (13.00 ± 1.00 vs 11.00 ± 1.00, ranges overlap)" in text
  assert "lost ~ full_rank < cola ~ galore." in text       # 12 vs 12: touching ranges overlap
  assert "Not yet complete at both budgets:" in text and "sltrain" in text
  same = compare_report.settled_text(TINY_PROTO, {3: long_, 6: long_})
  assert "is the same as at 192 tokens" in same and "change order" not in same
  assert compare_report.settled_text(TINY_PROTO, {3: rows({}), 6: long_}).startswith("Pending")


@pytest.mark.slow
def test_a_diverged_run_is_a_result_not_a_crash(tmp_path):
  cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("full_rank", 120, 0, 3))
  cfg.train.max_skipped_steps = 1       # lr 1e-2 x 2^120 ~ 1e34: the first step at peak lr overflows
  kw = dict(results_dir=str(tmp_path / "res"))
  result = runs.run(cfg, str(tmp_path / "w"), **kw)
  assert result["eval_ppl"] == math.inf and "training diverged" in result["diverged"]
  assert runs.run(cfg, str(tmp_path / "w"), **kw)["eval_ppl"] == math.inf   # stored, reused
