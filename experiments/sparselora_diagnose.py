"""Is SparseLoRA's channel choice right on a real model? A NumPy re-derivation, layer by layer.

  python -m experiments.sparselora_diagnose --config=configs/finetune.py:smollm2_135m_gsm

With --out=docs/results/sparselora_diagnose, the estimator comparison instead (`compare`):
per sparse layer of the preset's plan, for each estimator (svd / asvd, rank) and the tokens
its scores see (context / all), on held-out batches of the frozen base: the overlap of its
channels with the oracle's next to chance (k/N), the share of the layer's output the kept
channels lose, and the plan's batch loss; written to OUT.md and OUT.json.

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

from experiments import common, runs


# ------------------------------------------------------------------------------ NumPy (spec)


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_svd_factors(kernel_NxM: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """P [n, r] = U_r sqrt(s_r), Q [r, m] = sqrt(s_r) V_r^T (float64)."""
  u, s, vt = np.linalg.svd(np.asarray(kernel_NxM, np.float64), full_matrices=False)
  root = np.sqrt(s[:rank])
  return u[:, :rank] * root, root[:, None] * vt[:rank]


def np_estimator(kernel_NxM: np.ndarray, rank: int, moment_NxN: np.ndarray | None = None,
                 ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """Rank-r factors (P [n, r], Q [r, m]) of K (float64): the truncated SVD, or with the inputs'
  second moment C the minimiser A = P Q of ||R (K - A)||_F, R^T R = C + ridge * (tr C / n) I,
  by a Cholesky root R (estimator.asvd_estimator takes the symmetric root: same minimiser)."""
  k = np.asarray(kernel_NxM, np.float64)
  if moment_NxN is None:
    return np_svd_factors(k, rank)
  c = np.asarray(moment_NxN, np.float64)
  lower = np.linalg.cholesky(c + ridge * np.trace(c) / len(c) * np.eye(len(c)))
  u, s, vt = np.linalg.svd(lower.T @ k, full_matrices=False)
  return np.linalg.solve(lower.T, u[:, :rank] * s[:rank]), vt[:rank]


def np_second_moment(xs_BxLxD, masks_BxL) -> np.ndarray:
  """E[x^T x] over the masked-in tokens of several batches, [D, D] (float64)."""
  rows = np.concatenate([tokens_of(x, m) for x, m in zip(xs_BxLxD, masks_BxL)])
  return rows.T @ rows / max(len(rows), 1)


def np_token_mask(segment_ids_BxL, n_sparse: int, tokens: str) -> np.ndarray:
  """The tokens the channel scores see: the valid context (positions < n_sparse) or all."""
  valid = np.asarray(segment_ids_BxL) > 0
  return valid if tokens == "all" else valid & (np.arange(valid.shape[1]) < n_sparse)[None]


def np_top_k(score_N: np.ndarray, k: int) -> np.ndarray:
  """Sorted indices of the k largest scores."""
  return np.sort(np.argsort(-np.asarray(score_N), kind="stable")[:k])


def tokens_of(x_BxLxD: np.ndarray, valid_BxL: np.ndarray) -> np.ndarray:
  """The valid tokens' rows [N, D] (float64)."""
  return np.asarray(x_BxLxD, np.float64)[np.asarray(valid_BxL, bool)]


def spec_ffn_scores(x_BxLxD, valid_BxL, w_gate_DxF, w_up_DxF, rank: int) -> np.ndarray:
  """SPARSELORA.md's FFN estimator with the rank-r SVD factors of the kernels (below)."""
  return spec_ffn_scores_pq(x_BxLxD, valid_BxL, np_svd_factors(w_gate_DxF, rank),
                            np_svd_factors(w_up_DxF, rank))


def spec_ffn_scores_pq(x_BxLxD, valid_BxL, gate_pq, up_pq) -> np.ndarray:
  """SPARSELORA.md's FFN estimator: x_bar = per-sequence mean of the valid tokens;
  score_j = ||silu(x_bar Pg Qg)_j (x_bar Pu Qu)_j||_2 over the batch, [F]."""
  x = np.asarray(x_BxLxD, np.float64)
  w = np.asarray(valid_BxL, np.float64)
  x_bar = (x * w[..., None]).sum(1) / np.maximum(w.sum(1), 1.0)[:, None]
  (pg, qg), (pu, qu) = gate_pq, up_pq
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


def spec_column_norms_pq(x_BxLxD, valid_BxL, pq) -> np.ndarray:
  """||(x P Q)[:, c]|| over the valid tokens, [M]."""
  y = tokens_of(x_BxLxD, valid_BxL) @ pq[0] @ pq[1]
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


def chance_overlap(k: int, n: int) -> float:
  """E|a & b| / k for a uniformly random k-subset a of n channels and any fixed k-subset b:
  each of b's k channels is in a with probability k / n, so k / n."""
  return k / n


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


# ---------------------------------------------------------------------- estimator comparison

CHOICES = ("estimator", "oracle", "random")   # who picks the channels in a compared setting


def parse_estimators(text: str) -> list[tuple[str, int]]:
  """'svd:8,asvd:32' -> [('svd', 8), ('asvd', 32)]."""
  from lost_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  out = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    kind, _, rank = item.partition(":")
    if kind not in ("svd", "asvd") or not rank.isdigit() or int(rank) < 1:
      raise UserError(f"--estimators item {item!r}: not KIND:RANK with KIND svd or asvd. "
                       "Fix: e.g. --estimators=svd:8,asvd:32")
    out.append((kind, int(rank)))
  return out


def setting_name(kind: str, rank: int, tokens: str) -> str:
  return f"{kind} r{rank} {tokens}"


PAPER = setting_name("svd", 8, "context")   # the paper's estimator: what the others are held to


def reference_of(record: dict) -> str:
  """The setting the page compares the others with: the paper's, if measured."""
  return PAPER if PAPER in record["settings"] else record["default"]


def choose(blk, plan, i: int, rec, valid_BxL, n_sparse: int, est_layer, tokens: str,
           mode: str) -> dict:
  """lost_jax's channels of layer i from its recorded dense inputs: {'ffn': [k], 'v': [k],
  'k': [k]} for the sparse parts (mode svd: the estimator `est_layer`; tokens: what the scores
  see, the context or every valid token)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import model as sl  # pylint: disable=g-import-not-at-top
  cut = slice(None) if tokens == "all" else slice(0, n_sparse)
  valid = jnp.asarray(valid_BxL[:, cut])
  out = {}
  if plan.ffn[i] > 0:
    out["ffn"] = np.asarray(sl.ffn_indices(blk.mlp, jnp.asarray(rec.mlp_in)[:, cut], valid,
                                           est_layer, plan.ffn[i], mode))
  if plan.attn[i] > 0:
    idx = sl.attn_indices(blk.attn, jnp.asarray(rec.attn_in)[:, cut], valid, est_layer,
                          plan.attn[i], mode)
    out.update(v=np.asarray(idx.v), k=np.asarray(idx.k))
  return out


def spec_choice(rec, valid_BxL, n_sparse: int, np_layer: dict, k: dict, tokens: str) -> dict:
  """The NumPy re-derivation of an estimator's FFN and v channels (np_layer: float64 factors
  of gate, up and v; k: the kept counts)."""
  cut = slice(None) if tokens == "all" else slice(0, n_sparse)
  valid = valid_BxL[:, cut]
  out = {}
  if "ffn" in k:
    out["ffn"] = np_top_k(spec_ffn_scores_pq(np.asarray(rec.mlp_in)[:, cut], valid,
                                             np_layer["gate"], np_layer["up"]), k["ffn"])
  if "v" in k:
    out["v"] = np_top_k(spec_column_norms_pq(np.asarray(rec.attn_in)[:, cut], valid,
                                             np_layer["v"]), k["v"])
  return out


def layer_truth(blk, rec, valid_BxL, n_sparse: int) -> dict:
  """What the context tokens of one layer need (float64): the FFN's activations [N, F] and the
  kernels that turn kept channels into output."""
  ctx = valid_BxL[:, :n_sparse]
  return {"act": ffn_act(np.asarray(rec.mlp_in)[:, :n_sparse], ctx, kernel(blk.mlp.gate),
                         kernel(blk.mlp.up)),
          "down": kernel(blk.mlp.down), "attn_in": np.asarray(rec.attn_in)[:, :n_sparse],
          "ctx": ctx, "v": kernel(blk.attn.v), "k": kernel(blk.attn.k)}


def layer_metrics(got: dict, oracle: dict, truth: dict, spec: dict | None = None) -> dict:
  """Per sparse part: overlap with the oracle's channels, chance k / N, the share of the
  output the kept channels lose on the context tokens, and agreement with the NumPy spec."""
  row = {}
  if "ffn" in got:
    n = truth["act"].shape[1]
    row.update(ffn_k=len(got["ffn"]), ffn_chance=chance_overlap(len(got["ffn"]), n),
               ffn_overlap=overlap(got["ffn"], oracle["ffn"]),
               ffn_lost=ffn_error(truth["act"], truth["down"], got["ffn"]))
  if "v" in got:
    n = truth["v"].shape[1]
    row.update(v_k=len(got["v"]), v_chance=chance_overlap(len(got["v"]), n),
               v_overlap=overlap(got["v"], oracle["v"]),
               v_lost=column_error(truth["attn_in"], truth["ctx"], truth["v"], got["v"]),
               qk_overlap=overlap(got["k"], oracle["k"]),
               k_lost=column_error(truth["attn_in"], truth["ctx"], truth["k"], got["k"]))
  for part in ("ffn", "v"):
    if spec is not None and part in spec:
      row[f"{part}_spec_agree"] = overlap(got[part], spec[part])
  return row


def mean_rows(rows_by_batch: list[dict]) -> dict:
  """{layer: {metric: mean over batches}} of per-batch {layer: {metric: value}}."""
  out = {}
  for layer in rows_by_batch[0]:
    keys = rows_by_batch[0][layer]
    out[layer] = {k: float(np.mean([r[layer][k] for r in rows_by_batch])) for k in keys}
  return out


def summarize(layers: dict, loss: float, dense_loss: float, random_layers: dict | None = None
              ) -> dict:
  """One setting's summary over its sparse layers ({layer: mean metrics}): per part the mean
  overlap and chance, the layers at or below chance, the smallest margin over chance, the mean
  output lost, the layers losing at least as much as random channels; the plan loss."""
  out = {"loss": loss, "loss_vs_dense": loss - dense_loss}
  for part in ("ffn", "v"):
    rows = {i: r for i, r in layers.items() if f"{part}_overlap" in r}
    if not rows:
      continue
    margin = {i: r[f"{part}_overlap"] - r[f"{part}_chance"] for i, r in rows.items()}
    out[part] = {
        "layers": len(rows),
        "overlap": float(np.mean([r[f"{part}_overlap"] for r in rows.values()])),
        "chance": float(np.mean([r[f"{part}_chance"] for r in rows.values()])),
        "below_chance": sorted(int(i) for i, m in margin.items() if m <= 0),
        "min_margin": float(min(margin.values())),
        "lost": float(np.mean([r[f"{part}_lost"] for r in rows.values()]))}
    if random_layers is not None:
      out[part]["lost_not_below_random"] = sorted(
          int(i) for i, r in rows.items() if r[f"{part}_lost"] >= random_layers[i][f"{part}_lost"])
    agree = [r[f"{part}_spec_agree"] for r in rows.values() if f"{part}_spec_agree" in r]
    if agree:
      out[part]["min_spec_agree"] = float(min(agree))
  qk = [r["qk_overlap"] for r in layers.values() if "qk_overlap" in r]
  if qk:
    out["qk_overlap"] = float(np.mean(qk))
  return out


def beats_chance_everywhere(summary: dict) -> bool:
  """Overlap above chance and less output lost than random channels in every sparse layer."""
  return all(not summary[p]["below_chance"] and not summary[p].get("lost_not_below_random")
             for p in ("ffn", "v") if p in summary)


def better_everywhere(a: dict, b: dict) -> bool:
  """Summary a beats b on every measure: higher mean FFN and v overlap, less FFN and v output
  lost, lower plan loss."""
  parts = [p for p in ("ffn", "v") if p in a and p in b]
  return (all(a[p]["overlap"] > b[p]["overlap"] and a[p]["lost"] < b[p]["lost"] for p in parts)
          and a["loss"] < b["loss"])


def statements(summaries: dict[str, dict], reference: str, basis: str,
               default: str = "") -> list[str]:
  """The page's computed conclusions from the settings' summaries (estimator settings only:
  not 'oracle' / 'random'), `reference` the setting the others are compared with, `default`
  the setting the config fine-tunes with (said first)."""
  names = [n for n in summaries if n not in ("oracle", "random")]
  every = [n for n in names if beats_chance_everywhere(summaries[n])]
  out = []
  if default in summaries:
    out.append(f"The config's own estimator, {default}, "
               + ("beats chance in every sparse layer (overlap and output lost)"
                  if default in every else "does not beat chance in every sparse layer "
                  "(where it misses: below)") + ".")
  out.append(f"Beats chance in every sparse layer (FFN and attention-v overlap above k/N, and "
             f"less of the layer's output lost than random channels): "
             f"{', '.join(every) if every else 'no estimator setting'} ({len(every)} of "
             f"{len(names)}); measured on {basis}.")
  misses = []
  for n in names:
    parts = [f"{p} layers {summaries[n][p]['below_chance']} below chance"
             for p in ("ffn", "v") if summaries[n].get(p, {}).get("below_chance")]
    parts += [f"{p} layers {summaries[n][p]['lost_not_below_random']} losing no less than "
              "random" for p in ("ffn", "v")
              if summaries[n].get(p, {}).get("lost_not_below_random")]
    if parts:
      misses.append(f"{n}: {'; '.join(parts)}")
  if misses:
    out.append("Where the others miss: " + ". ".join(misses) + ".")

  def best(key, part=None, low=False):
    vals = {n: (summaries[n][part][key] if part else summaries[n][key]) for n in names
            if part is None or part in summaries[n]}
    pick = (min if low else max)(vals, key=vals.get)
    return pick, vals[pick], vals[reference]

  lines = []
  for label, key, part, low, fmt in [
      ("mean FFN overlap", "overlap", "ffn", False, "{:.3f}"),
      ("mean attention-v overlap", "overlap", "v", False, "{:.3f}"),
      ("least FFN output lost", "lost", "ffn", True, "{:.3f}"),
      ("least attention-v output lost", "lost", "v", True, "{:.3f}"),
      ("lowest plan loss", "loss", None, True, "{:.4f}")]:
    if part is not None and not any(part in summaries[n] for n in names):
      continue
    pick, val, ref = best(key, part, low)
    chance = (f", chance {summaries[pick][part]['chance']:.3f}" if key == "overlap" else "")
    lines.append(f"{label}: {pick} ({fmt.format(val)}{chance}; {reference}: "
                 f"{fmt.format(ref)})")
  out.append("Best on average over the sparse layers: " + "; ".join(lines) + ".")
  wins = [n for n in names if n != reference
          and better_everywhere(summaries[n], summaries[reference])]
  out.append(f"Better than {reference} on every measure (higher mean FFN and v overlap, less "
             f"FFN and v output lost, lower plan loss): {', '.join(wins) if wins else 'none'}.")
  return out


class Store:
  """<workdir>/compare.json: {fingerprint, results: {'<setting>|<batch>': measurement}},
  written after every measurement (a killed run goes on from there); a workdir measured with
  other settings is refused."""

  def __init__(self, workdir: str, fingerprint: dict):
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    from lost_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "compare.json")
    self.fingerprint = json.loads(json.dumps(fingerprint))
    self.results: dict = {}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        saved = json.load(f)
      if saved.get("fingerprint") != self.fingerprint:
        raise UserError(f"{self.path} holds measurements of other settings (config, "
                        "estimators, tokens, batches or code version). Fix: another --workdir, "
                        "or the flags and code that wrote it")
      self.results = saved["results"]

  def put(self, key: str, value: dict) -> None:
    import json  # pylint: disable=g-import-not-at-top
    from lost_jax import files  # pylint: disable=g-import-not-at-top
    self.results[key] = value
    files.atomic_write(self.path, json.dumps({"fingerprint": self.fingerprint,
                                              "results": self.results}))


def truncated(factors: dict, rank: int) -> dict:
  """Rank-`rank` factors from larger ones ({..: {'p': [n, R], 'q': [R, m]}} or (P, Q) pairs,
  nested): the first `rank` columns of P and rows of Q."""
  if isinstance(factors, tuple):
    return factors[0][:, :rank], factors[1][:rank]
  if set(factors) == {"p", "q"}:
    return {"p": factors["p"][:, :rank], "q": factors["q"][:rank]}
  return {k: truncated(v, rank) for k, v in factors.items()}


def check_layers(text: str, layers) -> list[int]:
  """The sparse layers the NumPy re-derivation checks: 'ends' (the first and the last),
  'all', or a comma list."""
  from lost_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if text == "all":
    return list(layers)
  if text == "ends":
    return sorted({layers[0], layers[-1]}) if layers else []
  try:
    out = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    out = [-1]
  if any(i not in layers for i in out):
    raise UserError(f"--numpy_check_layers={text!r}: not ends, all or sparse layers of the "
                    f"plan {list(layers)}. Fix: e.g. --numpy_check_layers=ends")
  return out


def _setting_cfg(run_cfg, kind: str, rank: int, tokens: str):
  from lost_jax import configs  # pylint: disable=g-import-not-at-top
  return configs.with_group(run_cfg, sparse=dict(run_cfg.sparse.to_dict(), estimator=kind,
                                                 estimator_rank=rank, estimator_tokens=tokens))


def compare(cfg, flags) -> dict:
  """Measure every estimator setting and the oracle / random references on held-out batches
  (resumable in --workdir); the page's JSON record."""
  # pylint: disable=g-import-not-at-top
  from lost_jax import configs, progress
  from lost_jax.adapters.sparselora import estimator as sl_estimator
  from lost_jax.adapters.sparselora import plan as sl_plan
  from lost_jax.data import instruct
  from lost_jax.errors import UserError
  from lost_jax.measure import flops
  from lost_jax.recipes import finetune
  cfg.sparse.enabled = True
  ests = parse_estimators(flags.estimators)
  tokens_list = [t.strip() for t in flags.estimator_tokens.split(",") if t.strip()]
  default = setting_name(cfg.sparse.estimator, cfg.sparse.estimator_rank,
                         cfg.sparse.estimator_tokens)
  settings = {setting_name(k, r, t): (k, r, t) for k, r in ests for t in tokens_list}
  bad = [t for t in tokens_list if t not in ("context", "all")]
  if bad or not tokens_list:
    raise UserError(f"--estimator_tokens={flags.estimator_tokens!r}: {bad or 'empty'} is not "
                    "context or all. Fix: e.g. --estimator_tokens=context,all")
  if default not in settings:
    raise UserError(f"the config's own estimator setting {default!r} is not compared. Fix: "
                     "include it in --estimators / --estimator_tokens.")
  # Loaded without sparsity (no estimator is built for nothing); the preset's plan, read here.
  cfg.sparse.enabled = False
  module, _, run_cfg, tok = finetune.adapted_and_tokenizer(cfg, None)
  run_cfg = configs.with_group(run_cfg, sparse=dict(run_cfg.sparse.to_dict(), enabled=True))
  plan = sl_plan.plan_from_config(run_cfg.sparse, run_cfg.model.n_layers)
  model, layers = module.model, plan.estimator_layers()
  check = check_layers(flags.numpy_check_layers, layers)
  batches = instruct.make_eval_batches(run_cfg.data, tok,
                                       run_cfg.train.batch_size)[:flags.eval_batches]
  # the code is part of what a measurement depends on: another version's are not reused
  store = Store(flags.workdir, {"config": run_cfg.to_json(), "settings": list(settings),
                                "eval_batches": flags.eval_batches, "numpy_check": check,
                                "code": runs.code_version()})
  names = list(settings) + ["oracle", "random"]
  lengths = [sl_plan.step_lengths(b["weights"], run_cfg.sparse.bucket, True) for b in batches]

  # The NumPy re-derivation's second moments: the dense inputs on the calibration batches.
  cal_batches, cal_lengths = finetune.calibration_inputs(run_cfg, tok)
  np_moments = {}
  if any(k == "asvd" for k, _, _ in settings.values()):
    xs = {(i, part): [] for i in layers for part in ("attn", "mlp")}
    for b in cal_batches:
      _, recs = record_inputs(model, {k: np.asarray(v) for k, v in b.items()})
      for i in layers:
        xs[(i, "attn")].append(np.asarray(recs[i].attn_in))
        xs[(i, "mlp")].append(np.asarray(recs[i].mlp_in))
    for tokens in tokens_list:
      masks = [np_token_mask(b["segment_ids"], b["inputs"].shape[1] - n.dense_len, tokens)
               for b, n in zip(cal_batches, cal_lengths)]
      np_moments[tokens] = {key: np_second_moment(x, masks) for key, x in xs.items()}
    del xs

  est_cache: dict = {}

  def estimators(name):
    """(lost_jax's estimators as the fine-tune builds them, the NumPy factors of the checked
    layers). Each kind (and for asvd each token set) is decomposed once, at its largest
    compared rank: rank-r factors are the first r of those (the same SVD)."""
    kind, rank, tokens = settings[name]
    key = (kind, tokens if kind == "asvd" else "")
    if key not in est_cache:
      top = max(r for k, r, _ in settings.values() if k == kind)
      est = finetune.estimators_of(_setting_cfg(run_cfg, kind, top, tokens), model, tok,
                                   layers)
      np_est = {}
      for i in progress.track(check, f"NumPy {kind} factors (float64)", "layer"):
        blk = model.layers[i]
        moment = (lambda part, i=i: None if kind == "svd" else np_moments[tokens][(i, part)])
        np_est[i] = {"gate": np_estimator(kernel(blk.mlp.gate), top, moment("mlp")),
                     "up": np_estimator(kernel(blk.mlp.up), top, moment("mlp")),
                     "v": np_estimator(kernel(blk.attn.v), top, moment("attn"))}
      est_cache[key] = (est, np_est)   # rank-r factors: every setting's fit in memory
    est, np_est = est_cache[key]
    return truncated(est, rank), truncated(np_est, rank)

  todo = [(bi, n) for bi in range(len(batches)) for n in names
          if f"{n}|{bi}" not in store.results]
  recorded: dict = {}
  with progress.bar(len(todo), "estimator settings x held-out batches", "measurement") as bar:
    for bi, name in todo:
      batch, n_sparse = batches[bi], batches[bi]["inputs"].shape[1] - lengths[bi].dense_len
      if bi not in recorded:
        recorded.clear()   # one batch's recorded inputs at a time
        logits, recs = record_inputs(model, batch)
        valid = np.asarray(batch["segment_ids"]) > 0
        truth = {i: layer_truth(model.layers[i], recs[i], valid, n_sparse) for i in layers}
        oracle = {i: choose(model.layers[i], plan, i, recs[i], valid, n_sparse, None,
                            "context", "oracle") for i in layers}
        recorded[bi] = (recs, valid, truth, oracle)
        if f"dense|{bi}" not in store.results:
          store.put(f"dense|{bi}", {
              "loss": token_loss(logits, batch["targets"], batch["weights"]),
              "context_tokens": int(valid[:, :n_sparse].sum()),
              "valid_tokens": int(valid.sum()),
              "loss_tokens": float(np.asarray(batch["weights"]).sum())})
      recs, valid, truth, oracle = recorded[bi]
      if name in ("oracle", "random"):
        est, np_est, tokens, mode = None, None, "context", name
        plan_v = sl_plan.SparsityPlan(plan.ffn, plan.attn, name)
      else:
        (est, np_est), tokens, mode = estimators(name), settings[name][2], "svd"
        plan_v = sl_plan.SparsityPlan(plan.ffn, plan.attn, "svd", estimator_tokens=tokens)
      rows = {}
      for i in layers:
        got = choose(model.layers[i], plan, i, recs[i], valid, n_sparse,
                     None if est is None else est[sl_estimator.layer_key(i)], tokens, mode)
        spec = None if np_est is None or i not in check else spec_choice(
            recs[i], valid, n_sparse, np_est[i],
            {p: len(got[p]) for p in ("ffn", "v") if p in got}, tokens)
        rows[str(i)] = layer_metrics(got, oracle[i], truth[i], spec)
      loss = plan_losses(model, est, batch, {name: plan_v}, lengths[bi].dense_len)[name]
      store.put(f"{name}|{bi}", {"layers": rows, "loss": loss})
      bar.update(1)

  res, nb = store.results, len(batches)
  dense_loss = float(np.mean([res[f"dense|{b}"]["loss"] for b in range(nb)]))
  per_layer = {n: mean_rows([res[f"{n}|{b}"]["layers"] for b in range(nb)]) for n in names}
  losses = {n: float(np.mean([res[f"{n}|{b}"]["loss"] for b in range(nb)])) for n in names}
  summaries = {n: summarize(per_layer[n], losses[n], dense_loss,
                            None if n == "random" else per_layer["random"]) for n in names}
  targets = tuple(t.strip() for t in run_cfg.lora.targets.split(",") if t.strip())

  def step_flops(p, rank):
    return float(np.mean([flops.sparselora_step_flops(
        run_cfg.model, p, batch=run_cfg.train.batch_size, seq_len=b["inputs"].shape[1],
        dense_len=n.dense_len, logits_len=n.logits_len, lora_rank=run_cfg.lora.rank,
        estimator_rank=rank, lora_targets=targets)["total"] for b, n in zip(batches, lengths)]))
  lora_flops = step_flops(sl_plan.SparsityPlan.dense(plan.n_layers), 1)
  for n, (kind, rank, tokens) in settings.items():
    # The accounting counts the estimator on the context tokens: 'all' would be undercounted.
    summaries[n]["flops_vs_lora"] = (step_flops(plan, rank) / lora_flops
                                     if tokens == "context" else None)
  return {
      "default": default, "settings": list(settings), "summaries": summaries,
      "layers": per_layer, "dense_loss": dense_loss,
      "plan": {"ffn": configs.format_layer_sparsity(plan.ffn),
               "attn": configs.format_layer_sparsity(plan.attn)},
      "basis": {"eval_batches": nb, "rows": int(sum(b["inputs"].shape[0] for b in batches)),
                "context_tokens": sum(res[f"dense|{b}"]["context_tokens"] for b in range(nb)),
                "valid_tokens": sum(res[f"dense|{b}"]["valid_tokens"] for b in range(nb)),
                "loss_tokens": sum(res[f"dense|{b}"]["loss_tokens"] for b in range(nb)),
                "calibration_batches": run_cfg.sparse.calibration_batches,
                "calibration_rows": len(cal_batches) * run_cfg.train.batch_size},
      "setup": {"base": run_cfg.init.path, "task": run_cfg.data.task,
                "template": run_cfg.data.template, "seq_len": run_cfg.data.seq_len,
                "bucket": run_cfg.sparse.bucket, "ridge": sl_estimator.ASVD_RIDGE,
                "numpy_check_layers": check},
      "code_version": common.code_version_line(), "environment": common.environment()}


def basis_text(record: dict) -> str:
  """What the numbers rest on, in words."""
  b = record["basis"]
  return (f"{b['eval_batches']} held-out batches ({b['rows']} problems, {b['context_tokens']} "
          f"context tokens scored, plan losses over {b['loss_tokens']:g} answer tokens)")


def render(record: dict, command: str) -> str:
  """The diagnosis page (markdown) of a `compare` record."""
  import os  # pylint: disable=g-import-not-at-top
  s, ref, b = record["summaries"], reference_of(record), record["basis"]
  setup = record["setup"]
  base = os.path.basename(setup["base"]) or "a random model"
  names = record["settings"] + ["oracle", "random"]

  def part(n, p, key, fmt="{:.3f}"):
    return fmt.format(s[n][p][key]) if p in s[n] else "-"

  def layers_of(n, p, key):
    if p not in s[n]:
      return "-"
    ids = s[n][p][key]
    return f"{len(ids)} ({', '.join(map(str, ids))})" if ids else "0"

  def agreement(summary):
    vals = [summary[p]["min_spec_agree"] for p in ("ffn", "v")
            if "min_spec_agree" in summary.get(p, {})]
    return f"{min(vals):.2f}" if vals else "-"

  def flops_cell(n):
    v = s[n].get("flops_vs_lora")
    return "-" if v is None else f"{v:.3f}"

  rows = [[n + (" (paper)" if n == PAPER else ""), part(n, "ffn", "overlap"),
           layers_of(n, "ffn", "below_chance"), part(n, "ffn", "lost"),
           part(n, "v", "overlap"), layers_of(n, "v", "below_chance"), part(n, "v", "lost"),
           f"{s[n]['qk_overlap']:.3f}" if "qk_overlap" in s[n] else "-",
           f"{s[n]['loss']:.4f}", f"{s[n]['loss_vs_dense']:+.4f}", flops_cell(n),
           agreement(s[n])]
          for n in names]
  chance = {p: next((s[n][p]["chance"] for n in names if p in s[n]), None)
            for p in ("ffn", "v")}
  lines = [
      f"# SparseLoRA's channel estimators on {base}: which channels they pick", "",
      common.page_head(command, record["code_version"]),
      f"Setup: base {base} (frozen; LoRA is zero at the start, so "
      f"this is the choice a fine-tune's first sparse step makes), task `{setup['task']}`, "
      f"template `{setup['template']}`, the preset's plan: FFN `{record['plan']['ffn']}`, "
      f"attention `{record['plan']['attn']}`. Measured on {basis_text(record)}: the first "
      "eval batches, which no estimator was fitted on. asvd estimators are fitted on the "
      f"first {b['calibration_batches']} training batches ({b['calibration_rows']} rows, "
      "`calibrate`'s batches), their second moment taken over the tokens the setting's "
      f"scores see (ridge {setup['ridge']:g} x the mean eigenvalue). {record['environment']}.",
      "",
      "Each layer's inputs are the dense model's (the choice of one layer, not the drift of "
      "earlier sparse layers). Oracle: the exact L2 channel norms on the context tokens (the "
      "tokens that run sparse); overlap = |chosen & oracle| / k, chance = k / N (a random "
      "k-subset's expected overlap). Output lost = ||y - y_kept|| / ||y|| on the context "
      "tokens: the FFN's down-projection output, attention's v projection output. Plan loss: "
      "the frozen model's loss on the batches' answer tokens with the whole plan sparse "
      "under that setting (context sparse, answers dense).",
      "",
      "## Summary", "",
      common.markdown_table(
          ["setting", f"FFN overlap (chance {chance['ffn']:.3f})" if chance["ffn"] else "FFN",
           "FFN layers <= chance", "FFN output lost",
           f"v overlap (chance {chance['v']:.3f})" if chance["v"] else "v",
           "v layers <= chance", "v output lost", "qk overlap", "plan loss",
           f"vs dense ({record['dense_loss']:.4f})", "FLOPs vs LoRA",
           "NumPy agreement (min)"], rows),
      "",
      "FLOPs vs LoRA: model FLOPs per training step at these batches' lengths "
      "(`measure.flops.sparselora_step_flops`), the estimator's included; '-' for `all` "
      "settings (the accounting counts the estimator on the context tokens only) and the "
      "references. NumPy agreement: the smallest |lost_jax's channels & the NumPy "
      "re-derivation's| / k over the batches and the checked layers "
      f"({', '.join(map(str, setup['numpy_check_layers']))}; estimator factors re-derived in "
      "float64, asvd's through a Cholesky root of C instead of the symmetric root).",
      "", "## Conclusions (computed from the table)", ""]
  lines += [f"- {t}" for t in statements(s, ref, basis_text(record), record.get("default", ""))]
  for p, title in (("ffn", "FFN"), ("v", "attention v")):
    layer_ids = sorted({int(i) for n in names for i, r in record["layers"][n].items()
                        if f"{p}_overlap" in r})
    if not layer_ids:
      continue
    for key, what in (("overlap", "overlap with the oracle"), ("lost", "output lost")):
      head = ["layer"] + (["chance"] if key == "overlap" else []) + names
      body = []
      for i in layer_ids:
        r = {n: record["layers"][n][str(i)] for n in names}
        body.append([i] + ([f"{r[names[0]][f'{p}_chance']:.3f}"] if key == "overlap" else [])
                    + [f"{r[n][f'{p}_{key}']:.3f}" for n in names])
      lines += ["", f"## {title}: {what}, per layer", "", common.markdown_table(head, body)]
  return "\n".join(lines) + "\n"


def write_page(record: dict, out: str, argv: list[str]) -> str:
  """OUT.json and OUT.md (the command at its head from argv, without --from_json)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from lost_jax import files  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  files.atomic_write(out + ".json", json.dumps(record, indent=1, sort_keys=True))
  command = common.command_line([a for a in argv if not a.startswith("--from_json")])
  files.atomic_write(out + ".md", render(record, command))
  return out + ".md"


# ------------------------------------------------------------------------------------- main


def main(argv, flags):
  if flags.out:
    return main_compare(argv, flags)
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


def main_compare(argv, flags):
  """--out: the estimator comparison page (or, with --from_json, re-render it)."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from lost_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    if flags.from_json:
      with open(flags.from_json, encoding="utf-8") as f:
        record = json.load(f)
    else:
      record = compare(flags.config.copy_and_resolve_references(), flags)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"wrote {write_page(record, flags.out, list(sys.argv))}", flush=True)
  print("\n".join(statements(record["summaries"], reference_of(record), basis_text(record),
                            record.get("default", ""))))
  del argv
  return 0


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
  flags.DEFINE_string("out", "", "Write the estimator comparison to OUT.md and OUT.json "
                      "(e.g. docs/results/sparselora_diagnose) instead of the tables above.")
  flags.DEFINE_string("estimators", "svd:8,svd:32,svd:64,asvd:8,asvd:32",
                      "--out: the estimators compared, KIND:RANK (KIND svd or asvd).")
  flags.DEFINE_string("estimator_tokens", "context,all",
                      "--out: the tokens each estimator's scores see (context, all).")
  flags.DEFINE_integer("eval_batches", 2, "--out: held-out (eval) batches measured.")
  flags.DEFINE_string("workdir", "/tmp/lost_jax_runs/sparselora_diagnose",
                      "--out: measurements cached here as they finish (resumable).")
  flags.DEFINE_string("from_json", "", "--out: only re-render the page from this JSON.")
  flags.DEFINE_string("numpy_check_layers", "ends", "--out: the sparse layers whose choice is "
                      "re-derived in NumPy (float64 SVDs): ends (first and last), all, or a "
                      "comma list.")
  return flags.FLAGS


if __name__ == "__main__":
  common.run_main(define_flags, main)
