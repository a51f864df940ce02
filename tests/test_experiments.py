"""experiments/compare_methods.py and ablate_lost.py on a tiny model for a few steps."""

import dataclasses
import json
import math
import os

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
            for e in TINY_PROTO.entries}
  assert all(n >= 4 for e, n in n_grid.items() if e in ("full_rank", "lost", "cola"))
  assert all(n >= 3 for n in n_grid.values())
  assert len(done) == sum(n_grid.values()) + len(TINY_PROTO.entries) * 5 + 4


def _table_rows(md: str) -> dict[str, list[str]]:
  rows = {}
  for line in md.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if line.startswith("|") and not set(cells[0]) <= {"-"}:
      rows.setdefault(cells[0], cells)   # first table wins
  return rows


def _full(get, trainable=1e6):
  """A lookup of _lookup's results completed with what a report reads of a real one."""
  def full(spec):
    r = get(spec)
    if r is None:
      return None
    return dict(r, params={"trainable": trainable, "projections": trainable / 2},
                tokens_per_s=100.0, seed=spec.seed,
                eval_curve=[[1, 0.0, 20.0], [3, 0.0, r["eval_ppl"]]])
  return full


def test_report_spreads_and_ranking(tmp_path):
  get, finish, _ = _lookup({e: -2 for e in compare_protocol.ENTRIES})
  full = _full(get)
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
  tables = md[:md.index("## Ranking, margins")]      # the statements' legend names "pending"
  assert "pending" not in tables and "Ranking of the methods with all seeds finished" in md
  assert "the comparison is complete" in md
  assert ("lost_gamma1 10.01 ± 0.01 (n=3) vs lost 10.01 ± 0.01 (n=3), +0.0% (ratio of means), "
          "at the same seed +0.0% (+0.0% .. +0.0%), ranges overlap") in md
  assert "full_rank_kaiming" not in md          # a v2 entry: not in the v1 protocol
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
  assert table["gamma=0.5"][6] == f"{100 * (mean('gamma=0.5') / mean('lost') - 1):+.1f}%"
  assert table["lost"][6] == "+0.0%" and table["gamma=0.9"][4] == "pending"
  assert {row[2] for row in table.values() if row[0] != "variant"} == {"0.003 (LOST's)"}
  ppl = {v: [r["eval_ppl"] for r in out[v]] for v in out}
  apart = max(ppl["gamma=0.5"]) < min(ppl["lost"]) or max(ppl["lost"]) < min(ppl["gamma=0.5"])
  assert table["gamma=0.5"][7] == ("apart" if apart else "overlap") and table["lost"][7] == ""
  # stored results are read back by config alone (--report_only)
  store = runs.Store(str(tmp_path / "res"), runs.code_version())
  again = ablate_lost.stored(TINY_PROTO, ["lost", "gamma=0.5", "gamma=0.9"], lr=3e-3, get=store)
  assert {v: [r["key"] for r in rs] for v, rs in again.items()} == {
      v: [r["key"] for r in out[v]] for v in out}


def test_ablation_rate_text_reads_the_neighbours_rates_from_the_comparison():
  res = lambda *ppl: [{"eval_ppl": p} for p in ppl]
  results = {"lost": res(40.0, 60.0), "gamma=1": res(60.0, 60.0),
             "activation=identity": res(100.0, 150.0), "gamma=0.5": res(50.0, 50.0)}
  budget = {"lost": {"lr": 2.5e-3, "eval_ppl": [48.0, 50.0, 52.0]},
            "lost_gamma1": {"lr": 1.25e-3, "eval_ppl": [53.0, 55.0, 57.0]},
            "low_rank": {"lr": 6.25e-4, "eval_ppl": [80.0]}}
  text = ablate_lost.rate_text(results, 2.5e-3, budget, "c.json")
  assert "activation=identity (+150.0% here, 2 seeds): low_rank chose 0.000625" in text
  assert "4x below the 0.0025 used here" in text
  assert ("gamma=1 (+20.0% here, 2 seeds): lost_gamma1 chose 0.00125 in the comparison, 2x "
          "below the 0.0025 used here; at that rate the same model was +10.0% against LOST "
          "(3 seeds)") in text
  assert "factor_init=random" not in text and "gamma=0.5" not in text   # no result / neighbour
  assert ablate_lost.rate_text(results, 2.5e-3, {}, "c.json") == ""


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


# ------------------------------------------------------------------------- protocol v2
TINY_V2 = dataclasses.replace(
    TINY_PROTO, entries=("full_rank", "lost", "lost_gamma1", "full_rank_kaiming"),
    eval_every=((3, 2), (6, 3), (12, 6)), long_steps=(12,), select_seed=3,
    select_steps=(3, 6), centres=(("full_rank", -5), ("lost", -2), ("lost_gamma1", -3),
                                  ("full_rank_kaiming", -5)))


def _run_plan(proto, get, finish):
  stages = []
  while True:
    todo = compare_protocol.plan(proto, get)
    if not todo:
      return stages
    stages.append(todo)
    finish(todo)


def test_v2_plan_chooses_on_the_selection_seed_per_budget_then_seeds_budget_by_budget():
  Spec = compare_protocol.Spec
  # lost's optimum sits at the edge of its first bracket (-3, -2, -1): one extension to 0
  get, finish, done = _lookup({"full_rank": -5, "lost": -1, "lost_gamma1": -3,
                               "full_rank_kaiming": -5})
  stages = _run_plan(TINY_V2, get, finish)
  entries = list(TINY_V2.entries)
  assert [s.entry for s in stages[0][:4]] == entries                      # interleaved
  assert {(s.seed, s.steps) for s in stages[0]} == {(3, 3)} and len(stages[0]) == 12
  assert {s.lr_index for s in stages[0] if s.entry == "lost"} == {-3, -2, -1}
  assert stages[1] == [Spec("lost", 0, 3, 3)]                             # the extension
  chosen = {"full_rank": -5, "lost": -1, "lost_gamma1": -3, "full_rank_kaiming": -5}
  assert stages[2] == [Spec(e, chosen[e], seed, 3) for seed in (0, 1, 2) for e in entries]
  # 2nd selection budget: each entry's 3-step choice and its neighbours, selection seed only
  assert {(s.entry, s.lr_index) for s in stages[3]} == {
      (e, chosen[e] + k) for e in entries for k in (-1, 0, 1)}
  assert {(s.seed, s.steps) for s in stages[3]} == {(3, 6)}
  assert stages[4] == [Spec(e, chosen[e], seed, 6) for seed in (0, 1, 2) for e in entries]
  assert stages[5] == [Spec(e, chosen[e], seed, 12) for seed in (0, 1, 2) for e in entries]
  assert len(stages) == 6 and len(done) == 12 + 1 + 12 + 12 + 12 + 12
  assert not [s for s in done if s.seed == 3 and s.steps == 12]   # 12 steps: no selection
  # the chosen rate at 12 steps is the 6-step choice, not the 3-step one
  done[Spec("lost", 0, 3, 6)] = {"eval_ppl": 5.0}          # at the edge: extended to 1
  assert compare_protocol.chosen_index(TINY_V2, "lost", 12, get) is None
  done[Spec("lost", 1, 3, 6)] = {"eval_ppl": 20.0}
  assert compare_protocol.chosen_index(TINY_V2, "lost", 12, get) == 0
  assert compare_protocol.chosen_index(TINY_V2, "lost", 3, get) == -1
  # the dry run's projection: later stages as if every choice lands on its centre
  get2, finish2, _ = _lookup(chosen)
  assert [len(s) for s in compare_protocol.projected_stages(TINY_V2, get2)] == [12] * 5
  text = compare_methods.dry_run_text(TINY_V2, get2, "t")
  assert "96 tokens: 24, 192 tokens: 24, 384 tokens: 12; 60 in all" in text


def test_v2_report_keeps_the_selection_seed_out_of_the_reported_numbers(tmp_path):
  get, finish, _ = _lookup({"full_rank": -5, "lost": -2, "lost_gamma1": -3,
                            "full_rank_kaiming": -5})
  full = _full(get, trainable=1e3)
  for _ in range(3):                        # the first two budgets only: 12 steps pending
    finish(compare_protocol.plan(TINY_V2, get))
  part = compare_report.write_report(TINY_V2, full, name="v", out_dir=str(tmp_path),
                                     command="cmd")
  assert "384 tokens (12 steps)**, no run finished: no entry has every seed yet." in part
  _run_plan(TINY_V2, get, finish)
  md = compare_report.write_report(TINY_V2, full, name="v", out_dir=str(tmp_path),
                                   command="cmd")
  for tokens in ("96", "192", "384"):
    rows = _table_rows(md[md.index(f"## {tokens} tokens"):])
    # seeds 0, 1, 2: 10.00, 10.01, 10.02; the selection seed 3 (10.03) is not among them
    assert rows["lost"][2:5] == ["3 of 3", "**10.01 ± 0.01**", "10.00 – 10.02"]
    assert rows["full_rank_kaiming"][6] == "+0.0% (+0.0% .. +0.0%)"
  selection = _table_rows(md[md.index("### 3 steps (96 tokens)"):])
  # columns 1e-2 x 2^-6 .. 2^-1 (the union of the entries' brackets)
  assert selection["lost"][1:] == ["", "", "", "11.03", "**10.03**", "11.03", "0.0025"]
  assert "### 6 steps (192 tokens)" in md and "### 12 steps" not in md
  assert "the runs of 12 steps (384 tokens) use the rate chosen at 6 steps" in md
  assert "seed 3, a selection seed that is not among the reported seeds (0, 1, 2)" in md
  assert "full_rank_kaiming 10.01 ± 0.01 (n=3) vs full_rank 10.01 ± 0.01 (n=3)" in md
  said = json.loads((tmp_path / "v.json").read_text())["statements"]
  assert set(said["lost_margin"]) == {"3", "6", "12"}
  assert said["budgets"]["12"]["tokens_per_trainable_param"]["lost"] == pytest.approx(0.384)
  assert (tmp_path / "v_select_6steps.png").stat().st_size > 0


def test_v2_differs_from_v1_in_the_shared_rate_and_starts_from_v1_choices():
  flat = lambda spec, p: _flat(compare_protocol.spec_config(p, spec).to_dict())
  Spec = compare_protocol.Spec
  v1, v2 = flat(Spec("lost", -2, 0, 256), compare_protocol.D256), flat(
      Spec("lost", -2, 0, 256), compare_protocol.D256_V2)
  assert {k for k in v1 if v1[k] != v2[k]} == {"train.shared_lr"} and v2["train.shared_lr"] == 5e-3
  fr, kaiming = (flat(Spec(e, -5, 0, 2048), compare_protocol.D256_V2)
                 for e in ("full_rank", "full_rank_kaiming"))
  assert {k for k in fr if fr[k] != kaiming[k] and k != "name"} == {"model.linear.dense_init"}
  assert kaiming["model.linear.dense_init"] == "kaiming" and fr["train.eval_every"] == 256
  assert compare_protocol.D256_V2.tokens(2048) == 4 * compare_protocol.D256.tokens(512)
  with open(os.path.join(os.path.dirname(__file__), "..", "docs", "results",
                         "compare_d256_v1.json")) as f:
    v1_rates = {e: r["lr"] for e, r in json.load(f)["budgets"]["256"].items()}
  centres = dict(compare_protocol.D256_V2.centres)
  for e in ("full_rank", "lost", "lost_gamma1"):
    assert compare_protocol.lr_of(centres[e]) == pytest.approx(v1_rates[e])
  assert centres["full_rank_kaiming"] == centres["full_rank"]


def test_store_finds_a_result_of_older_code_by_the_fields_it_records(tmp_path):
  cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -2, 0, 3))
  old = dict(runs.code_version(), sources="0" * 16)
  recorded = runs.keyed_config(cfg)
  del recorded["model"]["linear"]["dense_init"]          # a field the older code lacked
  runs.write_json(str(tmp_path / "a.json"), {"config": recorded, "code_version": old,
                                             "eval_ppl": 7.0, "key": "a"})
  store = runs.Store(str(tmp_path), old)
  assert store(cfg)["eval_ppl"] == 7.0 and store.unrecorded == {"model.linear.dense_init"}
  other = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -1, 0, 3))
  assert store(other) is None                            # a recorded field differs
  kaiming = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("lost", -2, 0, 3))
  kaiming.model.linear.dense_init = "kaiming"
  assert store(kaiming)["eval_ppl"] == 7.0               # unrecorded: not compared
  assert runs.Store(str(tmp_path), runs.code_version())(cfg) is None   # other code
  runs.write_json(str(tmp_path / "b.json"), {"config": recorded, "code_version": old,
                                             "eval_ppl": 8.0, "key": "b"})
  with pytest.raises(ValueError, match="2 results .* match"):
    runs.Store(str(tmp_path), old)(cfg)


def test_sources_version_line_names_the_commit_of_a_sources_hash():
  head = common._git("rev-parse", "HEAD")
  if not head:
    pytest.skip("not a git checkout")
  dirty = common._git("status", "--porcelain", "--", "lost_jax", "experiments/runs.py")
  at_head = common._sources_at([head])[head]
  if not dirty:     # the files read from git hash as runs.sources_hash reads them from disk
    assert at_head == runs.sources_hash()
  line = common.sources_version_line(at_head)
  named = line.split()[3]
  assert line.startswith("Code version: commit ") and common._sources_at([named])[named] == at_head
  assert common.sources_version_line("f" * 16).startswith("Code version: unknown")


# ------------------------------------------------------------------- computed statements
def _rows(ppl: dict[str, list[float]], trainable: float = 1e3) -> dict[str, dict]:
  """budget_rows of finished seeds 0, 1, ... with perplexities `ppl`."""
  return {e: {"lr_index": -2, "results": [{"eval_ppl": p, "seed": s,
                                           "params": {"trainable": trainable}}
                                          for s, p in enumerate(ps)]}
          for e, ps in ppl.items()}


def test_paired_change_is_per_seed():
  c = compare_report.paired_change({0: 9.0, 1: 12.0, 2: 30.0}, {0: 10.0, 1: 10.0, 3: 1.0})
  assert c["n"] == 2 and c["values"] == pytest.approx([-10.0, 20.0])
  assert (c["mean"], c["min"], c["max"]) == pytest.approx((5.0, -10.0, 20.0))
  assert compare_report.paired_change({0: 1.0}, {1: 1.0}) is None


def test_order_verdict_is_settled_only_where_the_order_holds_at_every_budget():
  v = compare_report.order_verdict
  ahead = {"x": {0: 10.0, 1: 11.0, 2: 12.0}, "y": {0: 11.0, 1: 12.0, 2: 13.0}}
  flipped = {"x": {0: 13.0, 1: 14.0, 2: 12.0}, "y": {0: 11.0, 1: 12.0, 2: 13.0}}
  mixed = {"x": {0: 10.0, 1: 12.5, 2: 10.0}, "y": {0: 11.0, 1: 12.0, 2: 13.0}}  # 1 seed behind
  assert v("x", "y", {1: ahead, 2: ahead, 3: ahead}, (1, 2, 3)) == (compare_report.SETTLED, [])
  verdict, why = v("x", "y", {1: ahead, 2: flipped, 3: ahead}, (1, 2, 3))
  assert verdict == compare_report.FLIPS and len(why) == 1 and "at 2 steps" in why[0]
  assert "+9.1% (-7.7% .. +18.2%)" in why[0]           # x against y per seed: 13/11, 14/12, 12/13
  verdict, why = v("x", "y", {1: ahead, 2: mixed, 3: ahead}, (1, 2, 3))
  assert verdict == compare_report.MEANS_ONLY and why == ["behind in 1 of 3 seed pairs at 2 steps"]
  verdict, why = v("x", "y", {1: ahead, 3: ahead}, (1, 2, 3))
  assert verdict == compare_report.PENDING and why == ["not finished at 2 steps"]
  # a flip is final even while another budget is pending
  assert v("x", "y", {1: flipped}, (1, 2, 3))[0] == compare_report.FLIPS
  # equal means are not "ahead"
  same = {"x": {0: 11.0, 1: 12.0}, "y": {0: 12.0, 1: 11.0}}
  assert v("x", "y", {1: same}, (1,))[0] == compare_report.FLIPS


def test_statements_rank_pair_and_settle_from_numbers():
  proto = dataclasses.replace(TINY_PROTO, entries=("full_rank", "lost", "cola", "galore"))
  short = _rows({"full_rank": [20, 22, 24], "lost": [16, 17, 18], "cola": [25, 23, 30],
                 "galore": [21, 21]})                                   # galore: 2 of 3 seeds
  long_ = _rows({"full_rank": [12, 13, 14], "lost": [10, 11, 12], "cola": [11, 12.5, 15],
                 "galore": [13, 14, 15]})
  text, data = compare_report.statements(proto, {3: short, 6: long_})
  # 96 / 192 tokens (3 / 6 steps x 2 x 16) over 1e3 trainable parameters
  assert "**96 tokens (3 steps)**, 0.10–0.10 tokens per trainable parameter" in text
  assert "1. lost (17.00), 2. full_rank (22.00), 3. cola (26.00)" in text
  assert "Not yet every seed: galore" in text
  assert data["budgets"]["3"]["ranking"] == ["lost", "full_rank", "cola"]
  lost = data["budgets"]["3"]["vs_full_rank"]["lost"]     # 16/20, 17/22, 18/24
  assert lost["min"] == pytest.approx(-25.0) and lost["max"] == pytest.approx(-20.0)
  assert data["lost_margin"]["6"]["mean"] == pytest.approx(
      100 * ((10 / 12 + 11 / 13 + 12 / 14) / 3 - 1))
  assert "LOST's margin over full_rank" in text and f"{data['lost_margin']['3']['mean']:+.1f}%" in text
  pairs = {(p["ahead"], p["behind"]): p["verdict"] for p in data["pairs"]}
  # order at 192 tokens: lost 11, cola 12.83, full_rank 13, galore 14
  assert list(pairs) == [("lost", "cola"), ("cola", "full_rank"), ("full_rank", "galore")]
  assert pairs[("lost", "cola")] == compare_report.SETTLED
  assert pairs[("cola", "full_rank")] == compare_report.FLIPS       # behind at 96 tokens
  assert pairs[("full_rank", "galore")] == compare_report.PENDING   # galore: 2 of 3 at 96
  assert "Settled: 1 of 3 neighbouring pair(s)" in text
  assert "- cola ahead of full_rank: **flips**: behind in the mean at 96 tokens" in text


@pytest.mark.slow
def test_a_diverged_run_is_a_result_not_a_crash(tmp_path):
  cfg = compare_protocol.spec_config(TINY_PROTO, compare_protocol.Spec("full_rank", 120, 0, 3))
  cfg.train.max_skipped_steps = 1       # lr 1e-2 x 2^120 ~ 1e34: the first step at peak lr overflows
  kw = dict(results_dir=str(tmp_path / "res"))
  result = runs.run(cfg, str(tmp_path / "w"), **kw)
  assert result["eval_ppl"] == math.inf and "training diverged" in result["diverged"]
  assert runs.run(cfg, str(tmp_path / "w"), **kw)["eval_ppl"] == math.inf   # stored, reused


def test_sources_hash_without_report_only_is_refused_in_one_line(capsys):
  assert common.results_version("", report_only=False) == (runs.code_version(), None)
  with pytest.raises(SystemExit) as e:
    common.results_version("0" * 16, report_only=False)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: ") and "Fix:" in err
  assert err.count("\n") == 1
