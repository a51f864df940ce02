"""Is SparseLoRA's channel choice right on a real model? A NumPy re-derivation, layer by layer.

  python -m experiments.sparselora_diagnose --config=configs/finetune.py:smollm2_135m_gsm

On a few real training batches of the preset and the frozen base (LoRA is zero at the start):
1. each sparse layer's normed inputs from the dense forward; the channels SPARSELORA.md's
   estimator (rank-r SVD, per-sequence mean for the FFN, all tokens for attention) and the
   exact oracle select, re-derived in NumPy from the kernels, against lost_jax's selections
   on the same inputs (`same` = identical index sets);
2. how much of the layer's output the kept channels lose on the context tokens,
   ||y_dense - y_kept|| / ||y_dense||, for the estimator's, the oracle's, the best channels
   (oracle by contribution ||act_j|| ||W_down[j]||) and random ones;
3. the batch loss of the base model, dense and with each sparsity plan (the preset, its
   oracle and random modes, and --variants): the loss a SparseLoRA step starts from.
"""

from __future__ import annotations

import numpy as np

from experiments import common


# ------------------------------------------------------------------------------ NumPy (spec)


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_svd_factors(kernel_NxM: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """P [n, r] = U_r sqrt(s_r), Q [r, m] = sqrt(s_r) V_r^T (float64)."""
  u, s, vt = np.linalg.svd(np.asarray(kernel_NxM, np.float64), full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


def np_top_k(score_N: np.ndarray, k: int) -> np.ndarray:
  """Sorted indices of the k largest scores."""
  return np.sort(np.argsort(-np.asarray(score_N), kind="stable")[:k])


def tokens_of(x_BxLxD: np.ndarray, valid_BxL: np.ndarray) -> np.ndarray:
  """The valid tokens' rows [N, D] (float64)."""
  return np.asarray(x_BxLxD, np.float64)[np.asarray(valid_BxL, bool)]


def spec_ffn_scores(x_BxLxD, valid_BxL, w_gate_DxF, w_up_DxF, rank: int) -> np.ndarray:
  """SPARSELORA.md's FFN estimator: x_bar = per-sequence mean of the valid tokens;
  score_j = ||silu(x_bar Pg Qg)_j (x_bar Pu Qu)_j||_2 over the batch, [F]."""
  x = np.asarray(x_BxLxD, np.float64)
  w = np.asarray(valid_BxL, np.float64)
  x_bar = (x * w[..., None]).sum(1) / np.maximum(w.sum(1), 1.0)[:, None]
  pg, qg = np_svd_factors(w_gate_DxF, rank)
  pu, qu = np_svd_factors(w_up_DxF, rank)
  act = np_silu(x_bar @ pg @ qg) * (x_bar @ pu @ qu)
  return np.sqrt((act * act).sum(0))


def ffn_act(x_BxLxD, valid_BxL, w_gate_DxF, w_up_DxF) -> np.ndarray:
  """silu(x Wg) * (x Wu) of the valid tokens, [N, F]."""
  x = tokens_of(x_BxLxD, valid_BxL)
  return np_silu(x @ np.asarray(w_gate_DxF, np.float64)) * (x @ np.asarray(w_up_DxF,
                                                                              np.float64))


def oracle_ffn_scores(act_NxF: np.ndarray) -> np.ndarray:
  """The L2 oracle: ||act[:, j]||_2 over the valid tokens, [F]."""
  return np.sqrt((act_NxF * act_NxF).sum(0))


def contribution_scores(act_NxF: np.ndarray, w_down_FxD: np.ndarray) -> np.ndarray:
  """||act[:, j] outer W_down[j]||_F = ||act_j|| ||W_down[j]||: channel j's whole share of the
  FFN output (the best single-channel ranking for the output error), [F]."""
  return oracle_ffn_scores(act_NxF) * np.linalg.norm(np.asarray(w_down_FxD, np.float64), axis=1)


def ffn_error(act_NxF: np.ndarray, w_down_FxD: np.ndarray, idx_K: np.ndarray) -> float:
  """||act Wd - act[:, idx] Wd[idx]||_F / ||act Wd||_F: the FFN output lost on these tokens."""
  wd = np.asarray(w_down_FxD, np.float64)
  idx = np.asarray(idx_K)
  dense = act_NxF @ wd
  kept = act_NxF[:, idx] @ wd[idx]
  return float(np.linalg.norm(dense - kept) / max(np.linalg.norm(dense), 1e-30))


def spec_column_norms(x_BxLxD, valid_BxL, kernel_DxM, rank: int | None = None) -> np.ndarray:
  """||(x K)[:, c]|| over the valid tokens; with rank, K replaced by its rank-r SVD, [M]."""
  k = np.asarray(kernel_DxM, np.float64)
  if rank is not None:
    p, q = np_svd_factors(k, rank)
    k = p @ q
  y = tokens_of(x_BxLxD, valid_BxL) @ k
  return np.sqrt((y * y).sum(0))


def column_error(x_BxLxD, valid_BxL, kernel_DxM, idx_K) -> float:
  """||y - y * mask(idx)|| / ||y|| of y = x K on the valid tokens (q/k/v kept columns)."""
  y = tokens_of(x_BxLxD, valid_BxL) @ np.asarray(kernel_DxM, np.float64)
  keep = np.zeros(y.shape[1], bool)
  keep[np.asarray(idx_K)] = True
  return float(np.linalg.norm(y[:, ~keep]) / max(np.linalg.norm(y), 1e-30))


def overlap(a_K, b_K) -> float:
  """|a & b| / |a|."""
  return float(np.intersect1d(a_K, b_K).size / max(1, np.unique(a_K).size))


def token_loss(logits_BxLxV: np.ndarray, targets_BxL, weights_BxL) -> float:
  """Weighted mean cross-entropy (float64 log-softmax)."""
  z = np.asarray(logits_BxLxV, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets_BxL)[..., None], -1)[..., 0]
  w = np.asarray(weights_BxL, np.float64)
  return float((nll * w).sum() / max(w.sum(), 1.0))


# --------------------------------------------------------------------------- model plumbing


class Recorder:
  """A `model.Llama` channel plan that runs a layer through `inner` (dense by default) and
  keeps its normed attention and MLP inputs."""

  def __init__(self, inner=None):
    from lost_jax.models import llama as model_lib  # pylint: disable=g-import-not-at-top
    self.inner = inner or model_lib.DENSE
    self.attn_in = self.mlp_in = None

  def attention_projection(self, attn, h_BxLxD):
    self.attn_in = h_BxLxD
    return self.inner.attention_projection(attn, h_BxLxD)

  def mlp(self, mlp, h_BxLxD):
    self.mlp_in = h_BxLxD
    return self.inner.mlp(mlp, h_BxLxD)


def record_inputs(model, batch: dict, inner=None) -> tuple[np.ndarray, list[Recorder]]:
  """(float32 logits [B, L, V], one Recorder per layer) of a forward with `inner` plans."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  recs = [Recorder(None if inner is None else inner[i]) for i in range(len(model.layers))]
  logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]), channels=recs)
  return np.asarray(logits), recs


def kernel(lin) -> np.ndarray:
  return np.asarray(lin.kernel[...], np.float64)


def layer_table(model, est, plan, batch: dict, recs: list[Recorder], n_sparse: int,
                rank: int, seed: int = 0) -> list[dict]:
  """Per sparse layer: spec vs lost_jax selections and the output lost by each channel set."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import model as sl  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import estimator as sl_estimator  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import select as sl_select  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  valid = np.asarray(batch["segment_ids"])[:, :n_sparse] > 0
  rows = []
  for i in plan.estimator_layers():
    blk, row = model.layers[i], {"layer": i}
    if plan.ffn[i] > 0:
      h = np.asarray(recs[i].mlp_in)[:, :n_sparse]
      wg, wu, wd = kernel(blk.mlp.gate), kernel(blk.mlp.up), kernel(blk.mlp.down)
      f = wg.shape[1]
      k = sl_select.keep_count(f, plan.ffn[i])
      act = ffn_act(h, valid, wg, wu)
      spec = np_top_k(spec_ffn_scores(h, valid, wg, wu, rank), k)
      orac = np_top_k(oracle_ffn_scores(act), k)
      best = np_top_k(contribution_scores(act, wd), k)
      rand = np.sort(rng.choice(f, k, replace=False))
      ours = {m: np.asarray(sl.ffn_indices(blk.mlp, jnp.asarray(h), jnp.asarray(valid),
                                            est.get(sl_estimator.layer_key(i)), plan.ffn[i], m))
              for m in ("svd", "oracle")}
      row.update(ffn_k=k, ffn_same_svd=bool(np.array_equal(ours["svd"], spec)),
                 ffn_same_oracle=bool(np.array_equal(ours["oracle"], orac)),
                 ffn_overlap=overlap(spec, orac), ffn_overlap_best=overlap(orac, best),
                 ffn_err_svd=ffn_error(act, wd, spec), ffn_err_oracle=ffn_error(act, wd, orac),
                 ffn_err_best=ffn_error(act, wd, best), ffn_err_random=ffn_error(act, wd, rand))
    if plan.attn[i] > 0:
      h = np.asarray(recs[i].attn_in)[:, :n_sparse]
      wv = kernel(blk.attn.v)
      c = wv.shape[1]
      k = sl_select.keep_count(c, plan.attn[i])
      spec = np_top_k(spec_column_norms(h, valid, wv, rank), k)
      orac = np_top_k(spec_column_norms(h, valid, wv), k)
      rand = np.sort(rng.choice(c, k, replace=False))
      ours = {m: sl.attn_indices(blk.attn, jnp.asarray(h), jnp.asarray(valid),
                                  est.get(sl_estimator.layer_key(i)), plan.attn[i], m)
              for m in ("svd", "oracle")}
      row.update(v_k=k, v_same_svd=bool(np.array_equal(np.asarray(ours["svd"].v), spec)),
                 v_same_oracle=bool(np.array_equal(np.asarray(ours["oracle"].v), orac)),
                 v_overlap=overlap(spec, orac), v_err_svd=column_error(h, valid, wv, spec),
                 v_err_oracle=column_error(h, valid, wv, orac),
                 v_err_random=column_error(h, valid, wv, rand),
                 k_err_svd=column_error(h, valid, kernel(blk.attn.k), np.asarray(ours["svd"].k)),
                 k_err_oracle=column_error(h, valid, kernel(blk.attn.k),
                                           np.asarray(ours["oracle"].k)))
    rows.append(row)
  return rows


def with_adapters(run_cfg, module, plan, workdir: str):
  """`module` (a SparseLoRALlama of `run_cfg`, the run config `finetune.adapted_model`
  returned, and `plan`) with the LoRA parameters of the newest checkpoint in `workdir` (a
  finished fine-tune of the same config); workdir is only read."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lost_jax.training import checkpoint
  from lost_jax.recipes import finetune
  from lost_jax.data import instruct
  from lost_jax.data import tokenizer
  from lost_jax.training import runtime  # pylint: disable=g-import-not-at-top
  setup = finetune.make_setup(run_cfg, module, plan, runtime.make_mesh(run_cfg))
  rest = setup.place_rest()
  cfg = run_cfg
  ckpt = checkpoint.Checkpointer(workdir, every=run_cfg.train.ckpt_every,
                                 keep=run_cfg.train.keep_checkpoints)
  tok = tokenizer.from_path(cfg.init.path)
  it = instruct.make_train_iterator(cfg.data, tok, cfg.train.batch_size, seed=cfg.seed)
  found = ckpt.restore_latest(checkpoint.abstract_with_shardings(setup.abstract_state,
                                                                 setup.state_shardings),
                              None, it)
  ckpt.close()
  if found is None:
    raise ValueError(f"--lora_workdir={workdir} has no checkpoint. Fix: a finished run's "
                     "workdir (a copy: nothing is written there).")
  return nnx.merge(setup.graphdef, found[1]["params"], rest), found[0]


def plan_losses(model, est, batch: dict, plans: dict, dense_len: int) -> dict[str, float]:
  """Batch loss of the model under each named SparsityPlan (dense_len static)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import model as sl  # pylint: disable=g-import-not-at-top
  out = {}
  for name, plan in plans.items():
    logits = sl.forward(model, jnp.asarray(batch["inputs"]), est, plan, dense_len,
                        jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    out[name] = token_loss(np.asarray(logits), batch["targets"], batch["weights"])
  return out


def drift(model, est, plan, batch: dict, dense_recs, dense_len: int) -> list[tuple[int, float,
                                                                                    float]]:
  """Per layer (i, context drift, output drift): ||h_sparse - h_dense|| / ||h_dense|| of the
  normed MLP inputs of the context (sparse) and the dense-suffix tokens under `plan`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import model as sl  # pylint: disable=g-import-not-at-top
  length = batch["inputs"].shape[1]
  n_sparse = length - dense_len
  valid = jnp.asarray(batch["segment_ids"]) > 0
  inner = [sl.LayerChannels(layer=i, plan=plan, estimators=est, n_sparse=n_sparse,
                            valid_BxL=valid, how="mask" if plan.mode == "oracle" else "gather")
           for i in range(plan.n_layers)]
  _, recs = record_inputs(model, batch, inner)
  v = np.asarray(batch["segment_ids"]) > 0
  out = []
  for i, (a, b) in enumerate(zip(recs, dense_recs)):
    ha, hb = np.asarray(a.mlp_in, np.float64), np.asarray(b.mlp_in, np.float64)
    rel = []
    for sl_ in (slice(0, n_sparse), slice(n_sparse, length)):
      da, db = ha[:, sl_][v[:, sl_]], hb[:, sl_][v[:, sl_]]
      rel.append(float(np.linalg.norm(da - db) / max(np.linalg.norm(db), 1e-30)))
    out.append((i, *rel))
  return out


# ------------------------------------------------------------------------------------- main


def main(argv, flags):
  del argv
  from lost_jax.recipes import finetune
  from lost_jax.data import instruct
  from lost_jax.adapters.sparselora import model as sl
  from lost_jax.adapters.sparselora import estimator as sl_estimator  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import plan as sl_plan  # pylint: disable=g-import-not-at-top
  from lost_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg = flags.config.copy_and_resolve_references()
  cfg.sparse.enabled = True
  module, plan, run_cfg = finetune.adapted_model(cfg, None)
  if flags.lora_workdir:
    module, step = with_adapters(run_cfg, module, plan, flags.lora_workdir)
    print(f"LoRA adapters of {flags.lora_workdir} (step {step})", flush=True)
  model = module.model
  est = jax.tree.map(lambda v: v[...], module.estimators,
                     is_leaf=lambda v: hasattr(v, "get_value"))
  n_layers = plan.n_layers
  tok = tokenizer.from_path(cfg.init.path)
  it = instruct.make_train_iterator(cfg.data, tok, cfg.train.batch_size, seed=cfg.seed)
  batches = [next(it) for _ in range(flags.batches)]
  plans = {"preset svd": plan}
  if flags.ablations:
    plans.update({"preset oracle": sl_plan.SparsityPlan(plan.ffn, plan.attn, "oracle"),
                  "preset random": sl_plan.SparsityPlan(plan.ffn, plan.attn, "random"),
                  "preset FFN only": sl_plan.SparsityPlan(plan.ffn, (0.0,) * n_layers),
                  "preset attention only": sl_plan.SparsityPlan((0.0,) * n_layers, plan.attn)})
  for spec in filter(None, (s.strip() for s in flags.variants.split(" "))):
    ffn, _, attn = spec.partition("|")
    for mode in flags.variant_modes.split(","):
      plans[f"{spec} {mode}"] = sl_plan.SparsityPlan(
          sl.parse_layer_sparsity(ffn, n_layers, "variant ffn"),
          sl.parse_layer_sparsity(attn, n_layers, "variant attn"), mode)
  need = sorted({i for p in plans.values() for i in p.estimator_layers()})
  missing = [i for i in need if sl_estimator.layer_key(i) not in est]
  if missing:
    est.update(sl_estimator.build_estimators(model, cfg.sparse.estimator_rank, missing))
  losses: dict[str, list[float]] = {}
  for bi, batch in enumerate(batches):
    w = batch["weights"]
    dense_len = sl_plan.step_lengths(w, cfg.sparse.bucket, True).dense_len
    n_sparse = w.shape[1] - dense_len
    out_in_sparse = float(w[:, :n_sparse].sum())
    ctx = int((batch["segment_ids"][:, :n_sparse] > 0).sum())
    print(f"batch {bi}: seq_len {w.shape[1]}, dense suffix {dense_len} (first loss column "
          f"{int(np.flatnonzero(w.any(0))[0])}), sparse context tokens {ctx}, loss-weighted "
          f"tokens in the sparse prefix {out_in_sparse:g} (must be 0)", flush=True)
    logits, recs = record_inputs(model, batch)
    losses.setdefault("dense", []).append(token_loss(logits, batch["targets"], w))
    if bi == 0 and flags.layers:
      rows = layer_table(model, est, plan, batch, recs, n_sparse, cfg.sparse.estimator_rank)
      print_layer_table(rows)
      print("\ndrift of the normed MLP inputs under the preset (svd): ||h_sparse - h_dense|| / "
            "||h_dense||", flush=True)
      print(common.markdown_table(
          ["layer", "context tokens", "dense-suffix tokens"],
          [[i, f"{a:.3f}", f"{b:.3f}"] for i, a, b in drift(model, est, plan, batch, recs,
                                                            dense_len)]), flush=True)
    for name, value in plan_losses(model, est, batch, plans, dense_len).items():
      losses.setdefault(name, []).append(value)
  what = "base + adapters" if flags.lora_workdir else "base-model"
  print(f"\n{what} loss on {len(batches)} training batches (dense suffix dense):")
  dense = np.mean(losses["dense"])
  print(common.markdown_table(
      ["plan", "loss", "vs dense"],
      [[n, f"{np.mean(v):.4f}", f"{np.mean(v) - dense:+.4f}"] for n, v in losses.items()]))


def print_layer_table(rows: list[dict]) -> None:
  def f(r, key, fmt="{:.2f}"):
    return fmt.format(r[key]) if key in r else "-"

  def same(r, key):
    return ("yes" if r[key] else "NO") if key in r else "-"
  print("\nFFN (context tokens, dense inputs): spec = SPARSELORA.md's estimator re-derived in "
        "NumPy; same = lost_jax selected exactly those channels; err = ||y - y_kept|| / ||y||")
  print(common.markdown_table(
      ["layer", "kept", "same svd", "same oracle", "svd∩oracle", "oracle∩best", "err svd",
       "err oracle", "err best", "err random"],
      [[r["layer"], f(r, "ffn_k", "{}"), same(r, "ffn_same_svd"), same(r, "ffn_same_oracle"),
        f(r, "ffn_overlap"), f(r, "ffn_overlap_best"), f(r, "ffn_err_svd"),
        f(r, "ffn_err_oracle"), f(r, "ffn_err_best"), f(r, "ffn_err_random")]
       for r in rows if "ffn_k" in r]))
  print("\nattention v (and k) columns (context tokens): err = share of ||x W|| dropped")
  print(common.markdown_table(
      ["layer", "kept kv ch", "same svd", "same oracle", "svd∩oracle", "err v svd",
       "err v oracle", "err v random", "err k svd", "err k oracle"],
      [[r["layer"], f(r, "v_k", "{}"), same(r, "v_same_svd"), same(r, "v_same_oracle"),
        f(r, "v_overlap"), f(r, "v_err_svd"), f(r, "v_err_oracle"), f(r, "v_err_random"),
        f(r, "k_err_svd"), f(r, "k_err_oracle")] for r in rows if "v_k" in r]), flush=True)


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/finetune.py:smollm2_135m_gsm",
                                  "configs/finetune.py:<preset>.", lock_config=False)
  flags.DEFINE_integer("batches", 2, "Training batches to measure on.")
  flags.DEFINE_string("variants", "", "Space-separated extra plans 'FFN|ATTN' in the config's "
                      "syntax, e.g. '0.5@12-27|0.6@16-18 0.9@20-27|'.")
  flags.DEFINE_string("lora_workdir", "", "A finished fine-tune's workdir (or a copy): "
                      "measure with its LoRA adapters instead of the bare base.")
  flags.DEFINE_bool("layers", True, "Print the per-layer tables (batch 0).")
  flags.DEFINE_bool("ablations", True, "Also the preset's oracle, random, FFN-only and "
                    "attention-only plans.")
  flags.DEFINE_string("variant_modes", "svd", "Comma list of modes for each variant.")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, main)
