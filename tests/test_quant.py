"""Block-wise quantisation and the 8-bit Adam: code books, round trips and steps against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import (adapter_model_config, fixed_batch, rand, randomize_lora, run_on_8_cpu_devices,
                     run_steps, train_step_config)
from lost_jax.ops import quant
from lost_jax.training import optim


def tree_codebook(signed: bool) -> np.ndarray:
  """Dynamic tree map by enumerating bit patterns: [sign] zeros(e) 1 fraction-bits (Dettmers '22)."""
  bits = 7 if signed else 8
  values = set()
  for code in range(2 ** bits):
    if code == 0:
      values.add(0.0)
      continue
    e = bits - code.bit_length()            # leading zeros = decimal exponent
    frac_bits = bits - e - 1                 # bits after the indicator 1
    j = code & ((1 << frac_bits) - 1)
    values.add(10.0 ** -e * (0.1 + 0.9 * (j + 1) / 2 ** frac_bits))
  values = np.array(sorted(values))
  if signed:
    values = np.concatenate([-values[:0:-1], values])
  return values


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_codebook_matches_bit_enumeration(signed):
  book = quant.dynamic_codebook(signed)
  ref = tree_codebook(signed)
  assert len(book) == (255 if signed else 256)
  np.testing.assert_allclose(book, ref, rtol=1e-6, atol=0)
  assert book[-1] == 1.0 and 0.0 in book


def np_quantize(x, book, block):
  """Brute force: absmax per block of the last axis, nearest code by argmin."""
  n = x.shape[-1]
  nb = -(-n // block)
  xp = np.zeros((*x.shape[:-1], nb * block), np.float64)
  xp[..., :n] = x
  xb = xp.reshape(*x.shape[:-1], nb, block)
  absmax = np.abs(xb).max(-1)
  scale = np.where(absmax > 0, absmax, 1.0)
  codes = np.abs(xb[..., None] / scale[..., None, None] - book).argmin(-1)
  deq = (book[codes] * scale[..., None]).reshape(*x.shape[:-1], -1)[..., :n]
  return codes.reshape(*x.shape[:-1], -1)[..., :n], scale, deq


@pytest.mark.parametrize("shape", [(3, 700), (2, 3, 256), (1000,)])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.slow
def test_blockwise_round_trip_against_numpy(shape, signed):
  rng = np.random.default_rng(0)
  # Heavy-tailed values spanning six decades, as Adam moments do.
  x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape)
  x = x if signed else np.abs(x)
  x[..., :5] = 0.0                       # exact zeros survive
  book = quant.dynamic_codebook(signed)
  codes, scales = jax.jit(lambda a: quant.quantize_blockwise(a, signed, 256))(
      jnp.asarray(x, jnp.float32))
  assert codes.dtype == jnp.uint8 and codes.shape == x.shape
  assert scales.shape == (*shape[:-1], -(-shape[-1] // 256))
  x32 = x.astype(np.float32)
  ref_codes, ref_scale, ref_deq = np_quantize(x32, book.astype(np.float64), 256)
  np.testing.assert_allclose(np.asarray(scales), ref_scale, rtol=1e-7)
  # The arithmetic index equals the brute-force nearest code, except where float32 rounding
  # decides a near-tie: there both codes are equally near to 1e-6 of the block's absmax.
  codes = np.asarray(codes)
  differ = codes != ref_codes
  assert differ.mean() < 1e-3, differ.mean()
  y = x32 / np.repeat(ref_scale, 256, -1)[..., :shape[-1]]
  np.testing.assert_allclose(np.abs(book[codes] - y)[differ], np.abs(book[ref_codes] - y)[differ],
                             atol=1e-6)
  deq = np.asarray(quant.dequantize_blockwise(jnp.asarray(codes), scales, signed, 256))
  np.testing.assert_allclose(deq, book[codes] * np.repeat(ref_scale, 256, -1)[..., :shape[-1]],
                             rtol=1e-6, atol=1e-30)
  assert (deq[..., :5] == 0).all()
  # Per block: relative error of values above 0.1 * absmax is at most half a step (0.9/64/2
  # signed, 0.9/128/2 unsigned) relative to 0.1, i.e. under 7.1% / 3.6%.
  big = np.abs(x) > 0.1 * np.repeat(ref_scale, 256, -1)[..., :shape[-1]]
  rel = np.abs(deq - x)[big] / np.abs(x)[big]
  assert rel.max() < (0.9 / 64 / 2 / 0.1 if signed else 0.9 / 128 / 2 / 0.1) + 1e-6


def np_adam8bit(grads, b1, b2, eps, block=256):
  """NumPy 8-bit Adam: moments re-quantised (mu; sqrt(nu)) after every step, as in optim."""
  sb, ub = tree_codebook(True), tree_codebook(False)
  m = v = np.zeros_like(grads[0], np.float64)
  out = []
  for t, g in enumerate(grads, 1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    m = np_quantize(m, sb, block)[2]
    v = np_quantize(np.sqrt(v), ub, block)[2] ** 2
  return out


def test_adam_8bit_matches_numpy_and_stays_near_32bit_adam():
  rng = np.random.default_rng(1)
  shape, steps, b1, b2, eps = (24, 300), 6, 0.9, 0.95, 1e-8
  scale = 10.0 ** rng.uniform(-4, 0, shape)       # per-entry gradient scales over 4 decades
  grads = [(rng.standard_normal(shape) * scale).astype(np.float32) for _ in range(steps)]
  params = {"w": jnp.zeros(shape), "tiny": jnp.zeros((8, 8))}
  tx = optim.scale_by_adam_8bit(b1, b2, eps, chunk_values=1500)   # 5-row chunks + remainder
  ref32 = optax.scale_by_adam(b1, b2, eps)
  state, state32 = tx.init(params), ref32.init(params)
  assert state.mu["w"].dtype == jnp.uint8 and state.mu_scale["w"].shape == (24, 2)
  assert state.mu["tiny"].dtype == jnp.float32      # under MIN_8BIT_SIZE: unquantised
  update = jax.jit(tx.update)
  expected = np_adam8bit([g.astype(np.float64) for g in grads], b1, b2, eps)
  for g, want in zip(grads, expected):
    tiny = jnp.asarray(g[:8, :8])
    u, state = update({"w": jnp.asarray(g), "tiny": tiny}, state)
    u32, state32 = ref32.update({"w": jnp.asarray(g), "tiny": tiny}, state32)
    np.testing.assert_allclose(np.asarray(u["w"]), want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(u["tiny"]), np.asarray(u32["tiny"]), rtol=1e-5, atol=1e-6)
    # Against 32-bit Adam (updates are O(1)): pure noise over 4 decades per block is the hard
    # case for mu; the median deviation stays ~1.5% after 6 steps.
    diff = np.abs(np.asarray(u["w"]) - np.asarray(u32["w"]))
    assert np.median(diff) < 0.03, np.median(diff)


@pytest.mark.parametrize("chunk_values,shards", [(1500, 1), (1500, 2), (300, 3), (10**6, 1)])
@pytest.mark.slow
def test_adam_8bit_in_row_chunks_equals_whole_tensor_update(chunk_values, shards):
  """Chunked in-place requantisation (5-row chunks + a remainder, per shard group of rows)
  gives the same codes as updating the whole tensor at once, and updates and scales within
  float32 rounding (XLA fuses the two programs differently: at most ~1 ulp per step)."""
  rng = np.random.default_rng(2)
  shape = (24, 300)
  whole = optim.scale_by_adam_8bit(0.9, 0.95, chunk_values=0)
  chunked = optim.scale_by_adam_8bit(0.9, 0.95, chunk_values=chunk_values,
                                     shards={"w": shards})
  params = {"w": jnp.zeros(shape), "b": jnp.zeros((5000,))}
  state = whole.init(params)
  update_whole, update_chunked = jax.jit(whole.update), jax.jit(chunked.update)
  for _ in range(4):
    g = {"w": jnp.asarray(rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 0, shape),
                          jnp.float32), "b": jnp.asarray(rng.standard_normal(5000), jnp.float32)}
    uw, sw = update_whole(g, state)
    uc, sc = update_chunked(g, state)     # from the same state: one step's rounding only
    np.testing.assert_array_equal(np.asarray(sc.mu["w"]), np.asarray(sw.mu["w"]))
    np.testing.assert_array_equal(np.asarray(sc.nu["w"]), np.asarray(sw.nu["w"]))
    for a, b in [(uc["w"], uw["w"]), (sc.mu_scale["w"], sw.mu_scale["w"]),
                 (sc.nu_scale["w"], sw.nu_scale["w"]), (uc["b"], uw["b"])]:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    state = sw
  assert np.count_nonzero(np.asarray(state.mu["w"]) != np.asarray(whole.init(params).mu["w"]))


def test_leading_shards_counts_the_devices_of_axis_0():
  mesh = jax.sharding.AbstractMesh((2, 4, 3), ("data", "fsdp", "tensor"))
  named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  tree = {"a": {"k": named("fsdp", None)}, "b": named(None, "tensor"), "c": named(),
          "d": named(("tensor", "fsdp"), "data")}
  assert optim.leading_shards(tree) == {"a/k": 4, "b": 1, "c": 1, "d": 12}


@pytest.mark.parametrize("method,optimizer", [("galore", "galore8bit")])   # adamw8bit: test_pipeline
@pytest.mark.slow
def test_8bit_optimizers_train(method, optimizer):
  cfg = train_step_config(method, vocab_size=512)     # embedding and head: 32768 values, quantised
  cfg.train.optimizer = optimizer
  losses, state = run_steps(cfg, fixed_batch(8, 32, 512), 40)
  codes = [x for x in jax.tree.leaves(state["opt_state"]) if x.dtype == jnp.uint8]
  assert len(codes) >= 4                        # mu and nu of embedding and head at least
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


_SHARD_SCRIPT = r"""
import json
import jax, numpy as np
from helpers import fixed_batch, run_steps, train_step_config
from lost_jax.parallel import sharding
from lost_jax.recipes import pretrain
out = {}
for shape in [(1, 2, 4), (1, 1, 1)]:
  cfg = train_step_config("full_rank", vocab_size=512)
  cfg.train.optimizer = "adamw8bit"
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
  devices = jax.devices()[: int(np.prod(shape))]
  setup = pretrain.make_setup(cfg, sharding.make_mesh(cfg.mesh, devices))
  adam = setup.state_shardings["opt_state"][1][0]   # chain(clip, adamw8bit) -> scale_by_adam_8bit
  out[str(shape) + "specs"] = [str(adam.mu["embed"]["embedding"].spec),
                               str(adam.mu_scale["embed"]["embedding"].spec),
                               str(setup.state_shardings["params"]["embed"]["embedding"].spec)]
  losses, state = run_steps(cfg, fixed_batch(8, 16, 512), 3, devices=devices)
  out[str(shape)] = losses
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_8bit_states_shard_like_parameters_and_match_one_device():
  result = run_on_8_cpu_devices(_SHARD_SCRIPT)
  codes, scales, param = result["(1, 2, 4)specs"]
  assert codes == param == "P('tensor', 'fsdp')", (codes, param)
  assert scales.startswith("P('tensor'") or scales.startswith("P(('tensor'"), scales  # [512, 1]
  np.testing.assert_allclose(result["(1, 2, 4)"], result["(1, 1, 1)"], rtol=2e-5)


# ------------------------------------------------------------------------------------- NF4


def test_nf4_levels_are_normal_quantiles():
  """QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles + 0, scaled to [-1, 1]."""
  from scipy.stats import norm
  offset = 1 - 0.5 * (1 / 32 + 1 / 30)
  pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([pos, [0.0], neg]))
  np.testing.assert_allclose(quant.NF4_LEVELS, levels / levels.max(), atol=1e-6)


@pytest.mark.parametrize("m", [256, 200])       # 200: a zero-padded tail block
@pytest.mark.slow
def test_nf4_round_trip_packing_and_selection_against_numpy(m):
  rng = np.random.default_rng(3)
  w = (rng.standard_normal((48, m)) * 0.02).astype(np.float32)
  q = quant.NF4Weight.from_kernel(jnp.asarray(w, jnp.bfloat16))
  nb = -(-m // 64)
  assert q.codes.shape == (48, nb * 32) and q.codes.dtype == jnp.uint8
  assert q.scales.shape == (48, nb) and q.shape == (48, m)
  wb = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
  ref_idx, ref_scale, ref = np_quantize(wb, quant.NF4_LEVELS.astype(np.float64), 64)
  # Packing: low nibble = even column, high nibble = odd column.
  packed = np.asarray(q.codes).astype(np.int64)
  idx = np.zeros((48, nb * 64), np.int64)
  idx[:, 0::2], idx[:, 1::2] = packed & 15, packed >> 4
  np.testing.assert_array_equal(idx[:, :m], ref_idx)
  np.testing.assert_allclose(np.asarray(q.scales), ref_scale, rtol=1e-7)
  deq = np.asarray(q[...], np.float64)
  assert q[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(deq, ref, rtol=8e-3, atol=1e-9)     # bf16 output rounding
  # Per block: error at most half the widest NF4 gap (0.304 / 2) x absmax, plus bf16 rounding.
  err = np.abs(deq - wb)
  bound = np.repeat(ref_scale, 64, -1)[:, :m] * (np.diff(quant.NF4_LEVELS).max() / 2 + 8e-3)
  assert (err <= bound).all()
  print("NF4 mean |error| / block absmax:", (err / np.repeat(ref_scale, 64, -1)[:, :m]).mean())
  cols = jnp.asarray([0, 1, 63, 64, 127, m - 1], jnp.int32)
  np.testing.assert_array_equal(np.asarray(q.take_cols(cols), np.float32),
                                np.asarray(q[...], np.float32)[:, np.asarray(cols)])
  rows = jnp.asarray([0, 5, 47], jnp.int32)
  np.testing.assert_array_equal(np.asarray(q.take_rows(rows), np.float32),
                                np.asarray(q[...], np.float32)[np.asarray(rows)])


def _nf4_and_dequantised_twins(targets):
  """(NF4-base model, the same model with plain kernels = the dequantised NF4), same LoRA."""
  from flax import nnx
  from lost_jax.adapters.lora import apply_lora, quantize_base
  from lost_jax.models.llama import Llama
  nf4 = quantize_base(Llama(adapter_model_config(2, 1), rngs=nnx.Rngs(0)))
  plain = Llama(adapter_model_config(2, 1), rngs=nnx.Rngs(0))
  for name in ("q", "k", "v", "o", "gate", "up", "down"):
    part = "attn" if name in "qkvo" else "mlp"
    a, b = (getattr(getattr(m.layers[0], part), name).kernel for m in (nf4, plain))
    assert isinstance(a.get_value(), quant.NF4Weight)
    b.set_value(a[...])
  for m in (nf4, plain):
    apply_lora(m, targets, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    randomize_lora(m, seed=2)
  return nf4, plain


@pytest.mark.slow
def test_nf4_base_sparse_mlp_and_attention_equal_dequantised_base():
  B, L = 2, 10
  D, F = (getattr(adapter_model_config(), k) for k in ("d_model", "ffn_dim"))
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import model as sl
  from lost_jax.adapters.sparselora import estimator as sl_estimator  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import plan as sl_plan  # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import restrict as sl_restrict  # pylint: disable=g-import-not-at-top
  nf4, plain = _nf4_and_dequantised_twins(("q", "v", "o", "down"))
  x = jnp.asarray(rand(B, L, D, seed=5))
  idx = jnp.asarray(np.sort(np.random.default_rng(0).choice(F, 24, replace=False)), jnp.int32)
  got = sl_restrict.sparse_mlp(nf4.layers[0].mlp, x, idx, 6)
  np.testing.assert_allclose(got, sl_restrict.sparse_mlp(plain.layers[0].mlp, x, idx, 6), rtol=1e-5,
                             atol=1e-6)
  # The whole SparseLoRA forward (FFN and attention sparse in layer 0, estimators from each
  # model's own kernels: the dequantised ones for NF4).
  plan = sl_plan.SparsityPlan.from_layers(1, ffn=0.5, ffn_layers="0", attn=0.5, attn_layers="0")
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 50, (B, L)), jnp.int32)
  # Each forward compiled once (nnx.jit), not dispatched op by op: the same math.
  logits = [nnx.jit(lambda m, t, est: sl.forward(m, t, est, plan, 4))(
      m, tokens, sl_estimator.build_estimators(m, 4, [0])) for m in (nf4, plain)]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
  # All tokens sparse: the gather path dequantises only the kept rows / columns, never a whole
  # [D, F] / [F, D] kernel.
  jaxpr = str(jax.make_jaxpr(lambda xx: sl_restrict.sparse_mlp(nf4.layers[0].mlp, xx, idx, L))(x))
  assert f"f32[{D},{F}]" not in jaxpr and f"f32[{F},{D}]" not in jaxpr
  assert f"f32[{D},24]" in jaxpr and f"f32[24,{D}]" in jaxpr


@pytest.mark.slow
def test_with_dequantized_matches_the_dequantised_kernel_forward_and_backward():
  """Values and input gradients equal those of fn(x, dequantize()) exactly; no gradient to
  codes/scales; the dequantised kernel is not a residual kept from forward to backward."""
  rng = np.random.default_rng(3)
  w = quant.NF4Weight.from_kernel(jnp.asarray(rng.standard_normal((96, 160)), jnp.float32))
  x = jnp.asarray(rng.standard_normal((2, 5, 96)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((2, 5, 160)), jnp.float32)
  fn = lambda x, k: jnp.tanh(x @ k)
  y, vjp = jax.vjp(lambda x: quant.with_dequantized(fn, x, w), x)
  y_ref, vjp_ref = jax.vjp(lambda x: fn(x, w.dequantize()), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  np.testing.assert_array_equal(np.asarray(vjp(cot)[0]), np.asarray(vjp_ref(cot)[0]))
  # Residuals carried from the forward to the backward pass: x, codes, scales, fn's own (the
  # tanh output), never a [96, 160] kernel.
  _, res = jax.linearize(lambda x: quant.with_dequantized(fn, x, w), x)
  shapes = [tuple(r.shape) for r in jax.tree.leaves(res)]
  assert (96, 160) not in shapes, shapes


def test_8bit_init_is_the_quantised_zero():
  tx = optim.scale_by_adam_8bit()
  state = tx.init({"w": jnp.zeros((3, 5000))})
  for codes, scales, signed in ((state.mu, state.mu_scale, True),
                                (state.nu, state.nu_scale, False)):
    want = quant.quantize_blockwise(jnp.zeros((3, 5000)), signed)
    np.testing.assert_array_equal(codes["w"], want[0])
    np.testing.assert_array_equal(scales["w"], want[1])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.slow
def test_dynamic_index_of_every_code_and_beside_every_midpoint(signed):
  book = quant.dynamic_codebook(signed).astype(np.float64)
  mid = (book[1:] + book[:-1]) / 2
  gap = np.diff(book)
  got = np.asarray(quant._dynamic_index(jnp.asarray(book, jnp.float32), signed))
  np.testing.assert_array_equal(got, np.arange(len(book)))
  below = np.asarray(quant._dynamic_index(jnp.asarray(mid - 0.01 * gap, jnp.float32), signed))
  above = np.asarray(quant._dynamic_index(jnp.asarray(mid + 0.01 * gap, jnp.float32), signed))
  np.testing.assert_array_equal(below, np.arange(len(book) - 1))
  np.testing.assert_array_equal(above, np.arange(1, len(book)))
