"""The decoder forward's performance settings (model.perf): each option against NumPy."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import np_silu, np_silu_grad, tiny_model_config
from lost_jax import configs, errors
from lost_jax.training import checkpoint
from lost_jax.models import generate
from lost_jax.layers import linear as layers
from lost_jax.adapters import lora
from lost_jax.models import llama as model_lib
from lost_jax.adapters.sparselora import model as sparselora
from lost_jax.ops import matmul as matmul_lib
from lost_jax.ops import attention as attention_lib
from lost_jax.adapters.sparselora import plan as sl_plan

B, L, H, G, K = 2, 12, 4, 2, 8


def np_causal_gqa(q, k, v, seg):
  """float64 causal GQA attention with a packed-segment mask; q [B,L,H,K], k/v [B,L,G,K]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, length, h, hd = q.shape
  allowed = np.tril(np.ones((length, length), bool))[None]
  if seg is not None:
    allowed = allowed & (seg[:, :, None] == seg[:, None, :])
  out = np.zeros_like(q)
  for hh in range(h):
    j = hh // (h // k.shape[2])
    s = np.einsum("bqk,bsk->bqs", q[:, :, hh], k[:, :, j]) / np.sqrt(hd)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, hh] = np.einsum("bqs,bsk->bqk", p / p.sum(-1, keepdims=True), v[:, :, j])
  return out


def qkv(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, L, H, K)), jax.random.normal(ks[1], (B, L, G, K)),
          jax.random.normal(ks[2], (B, L, G, K)))


SEG = np.array([[1] * 5 + [2] * 7, [1] * L])
KERNELS = {
    "blocked": lambda q, k, v, s: attention_lib.attention(q, k, v, s, q_block=4),
    # Blocks of 5, 5 and 2 queries: a last block shorter than the others.
    "blocked_ragged": lambda q, k, v, s: attention_lib.attention(q, k, v, s, q_block=5),
    "blocked_cpu_transposed": lambda q, k, v, s: attention_lib.attention(
        q, k, v, s, q_block=4, backward="cpu_transposed"),
    "dot_product_attention": lambda q, k, v, s: attention_lib.dot_product_attention(
        q, k, v, s, implementation="xla"),
    # jax's TPU Pallas kernel, run by the Pallas interpreter on CPU (L=12 is padded to 128).
    "splash": lambda q, k, v, s: attention_lib.splash_attention(q, k, v, s, interpret=True),
}


@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("seg", [None, SEG])
@pytest.mark.slow
def test_attention_kernel_matches_numpy_and_blocked_gradients(kind, seg):
  q, k, v = qkv()
  s = None if seg is None else jnp.asarray(seg)
  got = KERNELS[kind](q, k, v, s)
  np.testing.assert_allclose(got, np_causal_gqa(q, k, v, seg), rtol=2e-5, atol=2e-5)
  # Gradients of every option equal those of the plain-jnp masked-softmax reference.
  w = jax.random.normal(jax.random.key(9), (B, L, H, K))

  def reference(q, k, v):
    mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
    if s is not None:
      mask = mask & (s[:, None, :, None] == s[:, None, None, :])
    qg = q.reshape(B, L, G, H // G, K)
    sc = jnp.einsum("blgrk,bsgk->bgrls", qg, k) / np.sqrt(K)
    sc = jnp.where(mask[:, :, None], sc, -jnp.inf)
    out = jnp.einsum("bgrls,bsgk->blgrk", jax.nn.softmax(sc, -1), v)
    return out.reshape(B, L, H, K)

  g_got = jax.grad(lambda *a: jnp.sum(KERNELS[kind](*a, s) * w), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backward", configs.MATMUL_BACKWARDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_backward_options_match_numpy(backward, dtype):
  rng = np.random.default_rng(0)
  x, w, g = rng.normal(size=(2, 6, 16)), rng.normal(size=(16, 5)), rng.normal(size=(2, 6, 5))
  f = lambda x, w: jnp.sum(matmul_lib.matmul(x, w, dtype, jnp.float32, backward) * g)
  dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(x, jnp.float32),
                                                jnp.asarray(w, jnp.float32))
  tol = 1e-5 if dtype == "float32" else 3e-2       # bf16 operands, float32 accumulation
  np.testing.assert_allclose(dx, g @ w.T, rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(dw, np.einsum("btn,btm->nm", x, g), rtol=tol, atol=tol * 8)


@pytest.mark.parametrize("backward", configs.MATMUL_BACKWARDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_appended_matches_numpy_and_gives_the_constant_no_gradient(backward, dtype):
  rng = np.random.default_rng(1)
  x, w, g = rng.normal(size=(2, 6, 16)), rng.normal(size=(16, 5)), rng.normal(size=(2, 6, 7))
  c = np.eye(16)[:, [3, 11]]                                  # one-hot columns, as LOST's
  f = lambda x, w, c: jnp.sum(matmul_lib.matmul_appended(x, w, c, dtype, jnp.float32,
                                                         backward) * g)
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, c)]
  dx, dw, dc = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
  tol = 1e-5 if dtype == "float32" else 3e-2
  wc = np.concatenate([w, c], axis=1)
  y = matmul_lib.matmul_appended(*args, dtype, jnp.float32, backward)
  np.testing.assert_allclose(y, x @ wc, rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(dx, g @ wc.T, rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(dw, np.einsum("btn,btm->nm", x, g[..., :5]), rtol=tol,
                             atol=tol * 8)
  assert not np.any(np.asarray(dc))


@pytest.mark.parametrize("backward", configs.MATMUL_BACKWARDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_batched_matmul_and_its_gradients_match_numpy(backward, dtype, transpose_b):
  rng = np.random.default_rng(3)
  a, g = rng.normal(size=(2, 3, 6, 8)), rng.normal(size=(2, 3, 6, 5 if transpose_b else 4))
  b = rng.normal(size=(2, 3, 5, 8) if transpose_b else (2, 3, 8, 4))
  args = [jnp.asarray(x, dtype) for x in (a, b)]
  a, b = (np.asarray(x, np.float64) for x in args)         # the (rounded) operands it saw
  f = lambda a, b: matmul_lib.batched_matmul(a, b, transpose_b=transpose_b, backward=backward)
  y = jax.jit(f)(*args)
  da, db = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * g), argnums=(0, 1)))(*args)
  assert y.dtype == jnp.float32 and da.dtype == db.dtype == jnp.dtype(dtype)
  bm = np.swapaxes(b, -1, -2) if transpose_b else b      # [.., 8, n]
  want_db = np.einsum("...qs,...qk->...sk", *((g, a) if transpose_b else (a, g)))
  # bf16: float32 accumulation; the cotangent is rounded to bf16 for the backward products.
  tol = 1e-5 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(y, a @ bm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(da, np.float64), g @ np.swapaxes(bm, -1, -2),
                             rtol=tol, atol=tol * 4)
  np.testing.assert_allclose(np.asarray(db, np.float64), want_db, rtol=tol, atol=tol * 4)


@pytest.mark.slow
def test_bf16_blocked_attention_matches_the_float32_one():
  q, k, v = (a.astype(jnp.bfloat16) for a in qkv(4))
  w = jax.random.normal(jax.random.key(5), (B, L, H, K))
  seg = jnp.asarray(SEG)
  run = lambda backward, *a: attention_lib.attention(*a, seg, q_block=4, backward=backward)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = jax.grad(lambda *a: jnp.sum(run("xla", *a) * w), argnums=(0, 1, 2))(*f32)
  np.testing.assert_allclose(run("cpu_transposed", q, k, v).astype(jnp.float32),
                             np_causal_gqa(*f32, SEG), rtol=2e-2, atol=2e-2)
  for backward in configs.MATMUL_BACKWARDS:
    got = jax.grad(lambda *a: jnp.sum(run(backward, *a).astype(jnp.float32) * w),
                   argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(got, want):
      assert x.dtype == jnp.bfloat16
      np.testing.assert_allclose(x.astype(jnp.float32), y, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backward", configs.MATMUL_BACKWARDS)
def test_lora_delta_backward_options_match_numpy(backward):
  rng = np.random.default_rng(1)
  x, a, b, g = (rng.normal(size=s) for s in ((3, 7, 16), (16, 4), (4, 9), (3, 7, 9)))
  f = lambda x, a, b: jnp.sum(lora.lora_delta(x, a, b, 0.5, backward) * g)
  got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*(jnp.asarray(v, jnp.float32) for v in (x, a, b)))
  gu = 0.5 * g @ b.T                                    # d loss / d (x a)
  want = (gu @ a.T, np.einsum("btn,btr->nr", x, gu),
          np.einsum("btr,btm->rm", 0.5 * x @ a, g))
  for got_i, want_i in zip(got, want):
    np.testing.assert_allclose(got_i, want_i, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_and_its_gradients_match_numpy(dtype):
  rng = np.random.default_rng(2)
  g, u, dy = (rng.normal(scale=3.0, size=(3, 5, 7)) for _ in range(3))
  f = lambda g, u: jnp.sum(model_lib.swiglu(g, u).astype(jnp.float32) * dy)
  args = [jnp.asarray(a, dtype) for a in (g, u)]
  g, u = (np.asarray(a, np.float64) for a in args)   # the (rounded) inputs it saw
  y = jax.jit(model_lib.swiglu)(*args)
  dg, du = jax.jit(jax.grad(f, argnums=(0, 1)))(*args)
  assert y.dtype == dg.dtype == du.dtype == jnp.dtype(dtype)
  # bf16: float32 math, one rounding of each result (and of the cotangent): ~2^-8 relative.
  tol = 1e-5 if dtype == "float32" else 1e-2
  for got, want in ((y, np_silu(g) * u), (dg, dy * u * np_silu_grad(g)), (du, dy * np_silu(g))):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def tiny_model(matmul_backward, attention, remat=False):
  cfg = tiny_model_config(vocab_size=64, d_model=32, ffn_dim=48, remat=remat)
  cfg.perf.update(dict(matmul_backward=matmul_backward, attention=attention,
                       attention_impl="interpret" if attention == "splash" else "xla"))
  return model_lib.Llama(cfg, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_model_options_give_the_same_logits_and_gradients():
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 64)
  seg = jnp.asarray(SEG)
  results = []
  for backward in configs.MATMUL_BACKWARDS:
    for attention in configs.ATTENTIONS:
      model = tiny_model(backward, attention)
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss(p):
        logits = nnx.merge(graphdef, p, rest)(tokens, None, seg, logits_from=3)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
      (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      results.append((logits, jax.tree.leaves(grads)))
  assert results[0][0].shape == (B, L - 3, 64)
  for logits, grads in results[1:]:
    np.testing.assert_allclose(logits, results[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, results[0][1]):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_logits_from_equals_the_tail_of_all_logits():
  model = tiny_model("xla", "blocked")
  tokens = jax.random.randint(jax.random.key(2), (B, L), 0, 64)
  np.testing.assert_allclose(model(tokens, logits_from=7), model(tokens)[:, 7:], rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match="logits_from"):
    model(tokens, logits_from=L)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.slow
def test_last_block_runs_past_attention_on_the_logits_rows_only(remat, monkeypatch):
  # The last block's MLP sees only positions >= logits_from; logits and gradients equal
  # those of the full forward sliced afterwards.
  model = tiny_model("cpu_transposed", "blocked", remat=remat)
  rows = []
  mlp_call = model_lib.MLP.__call__
  monkeypatch.setattr(model_lib.MLP, "__call__",
                      lambda self, x: rows.append(x.shape[1]) or mlp_call(self, x))
  tokens = jax.random.randint(jax.random.key(3), (B, L), 0, 64)
  w = jax.random.normal(jax.random.key(4), (B, L - 5, 64))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, tail):
    m = nnx.merge(graphdef, p, rest)
    logits = m(tokens, logits_from=5) if tail else m(tokens)[:, 5:]
    return jnp.sum(logits * w), logits
  (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params, True)
  assert rows[-2:] == [L, L - 5]
  (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_is_resolved_from_the_target_platform():
  for platform, want in (("cpu", ("cpu_transposed", "blocked", "auto", "unrolled")),
                         ("gpu", ("xla", "dot_product_attention", "auto", "unrolled")),
                         ("tpu", ("xla", "splash", "pallas", "unrolled"))):
    cfg = configs.model_config("quickstart")
    configs.resolve_perf(cfg, platform)
    assert (cfg.perf.matmul_backward, cfg.perf.attention, cfg.perf.attention_impl,
            cfg.perf.layer_loop) == want
  cfg = configs.model_config("quickstart")
  cfg.perf.attention = "splash"                        # splash off TPU: the interpreter
  configs.resolve_perf(cfg, "cpu")
  assert cfg.perf.attention_impl == "interpret"
  del cfg.perf["layer_loop"]                           # a config saved before the setting
  assert configs.with_resolved_perf(cfg, "cpu").perf.layer_loop == "unrolled"
  for field, value in (("layer_loop", "vmap"), ("attention_impl", "cudnn")):
    bad = configs.model_config("quickstart")
    bad.perf.update(dict(attention="splash", **{field: value}))
    with pytest.raises(errors.UserError, match=f"model.perf.{field}.*Fix"):
      configs.validate_model(bad)
  cfg = configs.model_config("quickstart")
  cfg.perf.attention = "blocked"
  configs.resolve_perf(cfg, "tpu")                     # an explicit choice is kept
  assert cfg.perf.attention == "blocked"
  # Built without a resolution, the model resolves 'auto' once for the default device.
  model = model_lib.Llama(configs.model_config("quickstart"), rngs=nnx.Rngs(0))
  want = "cpu_transposed" if jax.devices()[0].platform == "cpu" else "xla"
  assert model.cfg.perf.matmul_backward == want
  assert model.layers[0].attn.q.backward == want
  with pytest.raises(ValueError, match="model.perf.attention"):
    bad = configs.model_config("quickstart")
    bad.perf.attention = "flash"
    configs.validate_model(bad)


def test_no_backend_sniffing_in_the_math_and_perf_not_in_checkpoint_fingerprint():
  for module in (layers, lora, model_lib):
    assert "default_backend" not in inspect.getsource(module)
  cfg = configs.pretrain_config("quickstart", "full_rank")
  a = checkpoint.model_fingerprint(cfg, 4096)
  cfg.model.perf.attention = "dot_product_attention"
  cfg.model.perf.layer_loop = "scan"          # one parameter layout: resumes either way
  assert checkpoint.model_fingerprint(cfg, 4096) == a


def kind_model(kind: str, layer_loop: str, n_layers: int = 3, remat: bool = False):
  """A float32 model of one projection kind (3 blocks: a layer-order bug changes logits)."""
  cfg = tiny_model_config(vocab_size=64, d_model=32, ffn_dim=48, n_layers=n_layers, remat=remat)
  cfg.linear = configs.pretrain_config("quickstart", "full_rank" if kind == "dense" else kind
                                       ).model.linear     # the preset's activation
  cfg.linear.rank = 8
  cfg.perf.update(dict(matmul_backward="xla", attention="blocked", layer_loop=layer_loop))
  return model_lib.Llama(cfg, rngs=nnx.Rngs(0))


def loss_and_grads(model, tokens, seg):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(tokens, None, seg, logits_from=2)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.mark.parametrize("kind", configs.LINEAR_KINDS)
@pytest.mark.slow
def test_scanned_layers_match_the_unrolled_loop(kind):
  tokens = jax.random.randint(jax.random.key(3), (B, L), 0, 64)
  seg = jnp.asarray(SEG)
  want_logits, want = loss_and_grads(kind_model(kind, "unrolled"), tokens, seg)
  got_logits, got = loss_and_grads(kind_model(kind, "scan", remat=kind == "lost"), tokens, seg)
  # One parameter layout for both loops: the same paths, so checkpoints load either way.
  assert jax.tree.structure(got) == jax.tree.structure(want)
  # Float32 rounding only: every leaf within 3e-5 of its own largest entry (a wrong layer
  # order or a parameter shared across blocks is off by O(1) of it).
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((got_logits, got)),
                          jax.tree.leaves((want_logits, want))):
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert err <= 3e-5 * float(np.max(np.abs(b))), (jax.tree_util.keystr(path), err)
  # Each block got its own gradient (a scan sharing block 0's parameters would not).
  q = [np.asarray(got["layers"][i]["attn"]["q"][next(iter(got["layers"][i]["attn"]["q"]))])
       for i in range(3)]
  assert not np.allclose(q[0], q[1]) and not np.allclose(q[1], q[2])


@pytest.mark.slow
def test_scanned_layers_decode_and_run_lora_like_the_unrolled_loop():
  prompts = jax.random.randint(jax.random.key(4), (B, 5), 1, 64)
  mask = jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
  tokens = jax.random.randint(jax.random.key(5), (B, L), 0, 64)
  out = {}
  for loop in configs.LAYER_LOOPS:
    model = kind_model("dense", loop)
    lora.apply_lora(model, ("q", "v", "down"), rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    for i, block in enumerate(model.layers):          # nonzero, per-layer different deltas
      block.attn.q.lora_b[...] = jax.random.normal(jax.random.key(10 + i), (4, 32)) * 0.3
    cache = model_lib.Cache.zeros(model.cfg, B, 9, jnp.ones((B, 9), bool), jnp.float32)
    assert (len(cache.kv) == 2) == (loop == "scan")    # scan: (k, v) [n_layers, B, S, G, K]
    _, grads = loss_and_grads(model, tokens, None)
    out[loop] = (generate.greedy_generate(model, prompts, mask, 4), grads)
  np.testing.assert_array_equal(out["scan"][0], out["unrolled"][0])
  for a, b in zip(jax.tree.leaves(out["scan"][1]), jax.tree.leaves(out["unrolled"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_scanned_layers_refuse_per_layer_channel_plans():
  model = kind_model("dense", "scan", n_layers=2)
  tokens = jax.random.randint(jax.random.key(6), (B, L), 0, 64)
  plan = sl_plan.SparsityPlan.from_layers(2, ffn=0.5, ffn_layers="1", mode="oracle")
  with pytest.raises(ValueError, match="layer_loop='scan'.*Fix"):
    sparselora.forward(model, tokens, None, plan, dense_len=4)
  # A plan with no sparse layer is the plain forward, scanned.
  dense = sparselora.forward(model, tokens, None, sl_plan.SparsityPlan.dense(2), 4)
  np.testing.assert_allclose(dense, model(tokens), rtol=1e-6, atol=1e-6)
  cfg = configs.finetune_config("quickstart")
  cfg.model.perf.layer_loop = "scan"
  with pytest.raises(errors.UserError, match="layer_loop.*Fix"):
    configs.validate_finetune(cfg)
