"""lost_jax.hf: HF LLaMA import/export, checked against transformers' LlamaForCausalLM."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers import hf_from_pretrained, tiny_model_config
from lost_jax import configs
from lost_jax.formats import hf
from lost_jax.layers.linear import DenseLinear
from lost_jax.layers.lost import LOSTLinear
from lost_jax.models.llama import Llama

VOCAB, D, F, LAYERS, HEADS, KV = 128, 64, 96, 2, 4, 2
TOKENS_BxL = np.random.RandomState(0).randint(0, VOCAB, (2, 24))


def tiny_cfg(kind="dense", **linear):
  cfg = tiny_model_config(kind, rank=8, vocab_size=VOCAB, d_model=D, ffn_dim=F, n_layers=LAYERS,
                          n_heads=HEADS, n_kv_heads=KV, rope_theta=50_000.0, norm_eps=1e-5)
  cfg.linear.update(linear)
  return cfg


@nnx.jit
def _forward(model, tokens_BxL):
  return model(tokens_BxL)


def logits(model, tokens=TOKENS_BxL):
  # Jitted: compiling the whole tiny forward is quicker than dispatching it op by op.
  return np.asarray(_forward(model, jnp.asarray(tokens)))


def hf_dict(**overrides):
  d = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
           hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
           num_attention_heads=HEADS, num_key_value_heads=KV, hidden_act="silu",
           rms_norm_eps=1e-5, rope_theta=50_000.0, rope_scaling=None, attention_bias=False,
           mlp_bias=False, tie_word_embeddings=False)
  d.update(overrides)
  return d


def write_config(path, d):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f)
  return str(path)


# ---------------------------------------------------------------- config.json (no torch)


def test_load_hf_config_reads_both_transformers_layouts(tmp_path):
  v4 = hf.load_hf_config(write_config(tmp_path / "v4", hf_dict(initializer_range=0.05)))
  v5 = hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}, head_dim=16)
  del v5["rope_theta"], v5["rope_scaling"]
  v5 = hf.load_hf_config(write_config(tmp_path / "v5", v5))
  for cfg in (v4, v5):
    assert (cfg.vocab_size, cfg.d_model, cfg.ffn_dim, cfg.n_layers) == (VOCAB, D, F, LAYERS)
    assert (cfg.n_heads, cfg.n_kv_heads) == (HEADS, KV)
    assert cfg.rope_theta == 50_000.0 and cfg.norm_eps == 1e-5
    assert cfg.linear.kind == "dense"
  assert v4.init_std == 0.05
  no_kv = hf_dict()
  del no_kv["num_key_value_heads"]   # absent means multi-head attention
  assert hf.load_hf_config(write_config(tmp_path / "mha", no_kv)).n_kv_heads == HEADS


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 8.0}),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),   # lacks its frequency bands
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("model_type", "phi3"),
])
def test_load_hf_config_refuses_what_llama_cannot_represent(tmp_path, field, value):
  path = write_config(tmp_path, hf_dict(**{field: value}))
  with pytest.raises(ValueError, match=f"{field}=.*cannot represent"):
    hf.load_hf_config(path)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_reads_both_layouts_and_round_trips_to_config_json(tmp_path, rope):
  v4 = hf.load_hf_config(write_config(tmp_path / "v4", hf_dict(rope_scaling=rope)))
  v5 = hf_dict(rope_parameters={**rope, "rope_theta": 50_000.0})
  del v5["rope_theta"], v5["rope_scaling"]
  v5 = hf.load_hf_config(write_config(tmp_path / "v5", v5))
  for cfg in (v4, v5):
    assert cfg.rope_scaling.type == rope["rope_type"] and cfg.rope_scaling.factor == rope["factor"]
    assert cfg.rope_theta == 50_000.0
  assert hf.hf_config(v4)["rope_scaling"] == rope


def _np_llama3_inv_freq(hd, theta, factor, low, high, old_len):
  """Meta's reference (llama-models apply_scaling), per frequency in a Python loop."""
  out = []
  for i in range(0, hd, 2):
    f = 1.0 / theta ** (i / hd)
    wavelen = 2 * np.pi / f
    if wavelen < old_len / high:
      out.append(f)
    elif wavelen > old_len / low:
      out.append(f / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def test_rope_inv_freq_matches_numpy_rederivation():
  from lost_jax.models.llama import RopeScaling, rope_inv_freq
  hd, theta = 128, 500_000.0
  got = np.asarray(rope_inv_freq(hd, theta, RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)))
  want = _np_llama3_inv_freq(hd, theta, 8.0, 1.0, 4.0, 8192)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  # All three bands occur: kept, divided by the factor, interpolated.
  assert (np.isclose(got, plain, rtol=1e-5).sum() > 0 and
          np.isclose(got, plain / 8, rtol=1e-5).sum() > 0 and
          (~np.isclose(got, plain, rtol=1e-5) & ~np.isclose(got, plain / 8, rtol=1e-5)).sum() > 0)
  np.testing.assert_allclose(np.asarray(rope_inv_freq(hd, theta, RopeScaling("linear", 4.0))),
                             plain / 4, rtol=1e-5)


# ---------------------------------------------------------------- lost_jax round trip (no torch)


@pytest.mark.slow
def test_export_then_import_is_exact_and_uses_hf_layout(tmp_path):
  model = Llama(tiny_cfg(), rngs=nnx.Rngs(1))
  hf.save_hf_llama(model, tmp_path, dtype="float32")
  tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
  assert len(tensors) == 3 + 9 * LAYERS
  q = tensors["model.layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(q, np.asarray(model.layers[1].attn.q.kernel[...]).T)
  assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (KV * D // HEADS, D)
  assert tensors["lm_head.weight"].shape == (VOCAB, D)
  back = hf.load_hf_llama(str(tmp_path))
  np.testing.assert_array_equal(logits(back), logits(model))


@pytest.mark.slow
def test_bfloat16_export_stores_bfloat16_and_reloads_rounded(tmp_path):
  model = Llama(tiny_cfg(), rngs=nnx.Rngs(2))
  hf.save_hf_llama(model, tmp_path)   # default dtype bfloat16
  with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="flax") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  back = hf.load_hf_llama(str(tmp_path))
  rounded = nnx.state(model)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), rounded)
  nnx.update(model, rounded)
  np.testing.assert_array_equal(logits(back), logits(model))


def test_import_on_a_mesh_places_params_by_logical_axes(tmp_path):
  from lost_jax.parallel import sharding
  model = Llama(tiny_cfg(), rngs=nnx.Rngs(3))
  hf.save_hf_llama(model, tmp_path, dtype="float32")
  mesh = sharding.make_mesh(configs.pretrain_config("quickstart", "full_rank").mesh)
  back = hf.load_hf_llama(str(tmp_path), mesh=mesh)
  kernel = back.layers[0].mlp.up.kernel[...]
  assert isinstance(kernel.sharding, jax.sharding.NamedSharding)
  assert kernel.sharding.mesh.axis_names == mesh.axis_names
  np.testing.assert_array_equal(logits(back), logits(model))


@pytest.fixture
def exported(tmp_path):
  hf.save_hf_llama(Llama(tiny_cfg(), rngs=nnx.Rngs(4)), tmp_path, dtype="float32")
  file = os.path.join(tmp_path, "model.safetensors")
  return str(tmp_path), file, load_file(file)


def test_wrong_shape_names_the_tensor(exported):
  path, file, tensors = exported
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = np.zeros((F + 1, D), np.float32)
  save_file(tensors, file)
  with pytest.raises(ValueError, match=rf"'{name}'.*\(97, 64\).*\(96, 64\)"):
    hf.load_hf_llama(path)


def test_missing_and_unexpected_tensors_are_named(exported):
  path, file, tensors = exported
  del tensors["model.layers.0.post_attention_layernorm.weight"]
  save_file(tensors, file)
  with pytest.raises(ValueError, match=r"'model.layers.0.post_attention_layernorm.weight' is "
                     "missing"):
    hf.load_hf_llama(path)
  tensors["model.layers.0.post_attention_layernorm.weight"] = np.ones(D, np.float32)
  tensors["model.layers.2.input_layernorm.weight"] = np.ones(D, np.float32)
  save_file(tensors, file)
  with pytest.raises(ValueError, match=r"'model.layers.2.input_layernorm.weight' is unexpected"):
    hf.load_hf_llama(path)


def test_missing_weights_file_is_explained(tmp_path):
  with pytest.raises(ValueError, match="safe_serialization=True"):
    hf.load_hf_llama(write_config(tmp_path, hf_dict()))


# ---------------------------------------------------------------- densify (no torch)


def test_dense_kernel_matches_numpy_rederivation_and_forward():
  layer = LOSTLinear(24, 16, rank=4, sparsity=0.25, gamma=0.6, activation="identity",
                     rngs=nnx.Rngs(5))
  a, b = np.asarray(layer.a[...]), np.asarray(layer.b[...])
  idx, vals = np.asarray(layer.indices[...]), np.asarray(layer.values[...])
  s = np.zeros((24, 16), np.float32)
  s[idx] = vals
  want = 0.6 * a @ b.T + 0.4 * s
  got = np.asarray(hf.dense_kernel(layer))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  x = np.random.RandomState(0).randn(3, 24).astype(np.float32)
  np.testing.assert_allclose(x @ got, np.asarray(layer(jnp.asarray(x))), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lost", "low_rank", "sltrain"])
@pytest.mark.slow
def test_densify_is_exact_for_linear_factorisations(kind):
  cfg = tiny_cfg(kind, activation="identity", sparsity=0.1, density=0.05)
  model = Llama(cfg, rngs=nnx.Rngs(6))
  before = logits(model)
  hf.densify(model)
  assert all(isinstance(hf.get_path(model, p), DenseLinear) for p in hf.linear_paths(LAYERS))
  assert model.cfg.linear.kind == "dense" and cfg.linear.kind == kind   # caller's cfg intact
  assert not nnx.state(model, nnx.Not(nnx.Param))   # no index sets left behind
  np.testing.assert_allclose(logits(model), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["lost", "cola"])
def test_densify_and_export_refuse_silu_factorisations(kind, tmp_path):
  model = Llama(tiny_cfg(kind, activation="silu", sparsity=0.1), rngs=nnx.Rngs(7))
  with pytest.raises(ValueError, match="densify"):
    hf.save_hf_llama(model, tmp_path)
  with pytest.raises(ValueError, match=r"layers\[0\]\.attn\.q: .*nonlinear activation"):
    hf.densify(model)


def test_export_refuses_unmerged_extra_params(tmp_path):
  model = Llama(tiny_cfg(), rngs=nnx.Rngs(8))
  model.layers[0].attn.q.lora_a = nnx.Param(jnp.zeros((D, 4)))
  with pytest.raises(ValueError, match=r"layers\[0\]\.attn\.q\.lora_a has no place"):
    hf.save_hf_llama(model, tmp_path)


# ---------------------------------------------------------------- parity with transformers


def _torch():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


def hf_logits(hf_model, tokens=TOKENS_BxL):
  torch, _ = _torch()
  with torch.no_grad():
    return hf_model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_model():
  torch, transformers = _torch()
  torch.manual_seed(0)
  # initializer_range 0.15 makes attention far from uniform, so a RoPE mismatch shows.
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV, rope_theta=50_000.0,
      rms_norm_eps=1e-5, initializer_range=0.15, max_position_embeddings=64,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():   # HF inits norms to ones; random scales test their mapping.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


def test_logits_match_transformers_single_and_sharded(hf_model, tmp_path):
  ref = hf_logits(hf_model)
  hf_model.save_pretrained(tmp_path / "single", safe_serialization=True)
  hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  for sub in ("single", "sharded"):
    model = hf.load_hf_llama(str(tmp_path / sub))
    diff = np.abs(logits(model) - ref).max()
    print(f"{sub}: max |logits - transformers| = {diff:.3g} (max |logits| {np.abs(ref).max():.3g})")
    assert diff < 1e-4


def test_parity_is_sensitive_to_the_rope_convention(hf_model, tmp_path):
  """Interleaving q/k pairs (Meta's original layout) must break parity: the test has teeth."""
  hf_model.save_pretrained(tmp_path, safe_serialization=True)
  model = hf.load_hf_llama(str(tmp_path))
  hd = D // HEADS
  perm = np.arange(hd).reshape(2, hd // 2).T.reshape(-1)   # [0, hd/2, 1, hd/2+1, ...]
  for block in model.layers:
    for lin, heads in ((block.attn.q, HEADS), (block.attn.k, KV)):
      k = lin.kernel[...].reshape(D, heads, hd)[:, :, perm].reshape(D, heads * hd)
      lin.kernel.set_value(k)
  assert np.abs(logits(model) - hf_logits(hf_model)).max() > 1e-2


def test_half_precision_checkpoints_load(hf_model, tmp_path):
  torch, _ = _torch()
  for dtype in (torch.bfloat16, torch.float16):
    half = type(hf_model)(hf_model.config).to(dtype)
    half.load_state_dict(hf_model.state_dict())
    half.save_pretrained(tmp_path / str(dtype), safe_serialization=True)
    # Reference: the same rounded weights computed in float32. (half.float() would not do:
    # .to(dtype) also rounded HF's RoPE frequency buffer.)
    rounded = type(hf_model)(hf_model.config).eval()
    rounded.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ref = hf_logits(rounded)
    model = hf.load_hf_llama(str(tmp_path / str(dtype)))
    assert model.layers[0].attn.q.kernel[...].dtype == jnp.float32
    diff = np.abs(logits(model) - ref).max()
    print(f"{dtype} checkpoint: max |logits - transformers| = {diff:.3g}")
    assert diff < 1e-4


def test_tied_embeddings_are_copied_into_lm_head(tmp_path):
  torch, transformers = _torch()
  torch.manual_seed(1)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
      num_attention_heads=HEADS, num_key_value_heads=KV, initializer_range=0.15,
      tie_word_embeddings=True)
  tied = transformers.LlamaForCausalLM(config).eval()
  tied.save_pretrained(tmp_path, safe_serialization=True)
  model = hf.load_hf_llama(str(tmp_path))
  np.testing.assert_array_equal(model.lm_head.kernel[...], model.embed.embedding[...].T)
  assert np.abs(logits(model) - hf_logits(tied)).max() < 1e-4


def test_export_reloads_in_transformers(hf_model, tmp_path):
  ref = hf_logits(hf_model)
  hf_model.save_pretrained(tmp_path / "src", safe_serialization=True)
  model = hf.load_hf_llama(str(tmp_path / "src"))
  hf.save_hf_llama(model, tmp_path / "f32", dtype="float32")
  diff = np.abs(hf_logits(hf_from_pretrained(str(tmp_path / "f32"))) - ref).max()
  print(f"float32 export reloaded by transformers: max |logits diff| = {diff:.3g}")
  assert diff < 1e-5
  hf.save_hf_llama(model, tmp_path / "bf16")   # default bfloat16
  ours = logits(hf.load_hf_llama(str(tmp_path / "bf16")))
  diff = np.abs(hf_logits(hf_from_pretrained(str(tmp_path / "bf16"))) - ours).max()
  print(f"bfloat16 export, transformers vs lost_jax: max |logits diff| = {diff:.3g}")
  assert diff < 1e-4


def test_densified_lost_model_runs_identically_in_transformers(tmp_path):
  model = Llama(tiny_cfg("lost", activation="identity", sparsity=0.1, init="normal"),
                rngs=nnx.Rngs(9))
  before = logits(model)
  hf.save_hf_llama(hf.densify(model), tmp_path, dtype="float32")
  diff = np.abs(hf_logits(hf_from_pretrained(str(tmp_path))) - before).max()
  assert diff < 1e-4


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_rope_scaling_logits_match_transformers_past_original_context(tmp_path, rope):
  """Tied embeddings, GQA, 96 positions > original_max_position_embeddings=64; import and
  export both agree with transformers."""
  torch, transformers = _torch()
  torch.manual_seed(2)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV, rope_theta=50_000.0,
      rope_scaling=dict(rope), rms_norm_eps=1e-5, initializer_range=0.15,
      max_position_embeddings=512, tie_word_embeddings=True)
  ref_model = transformers.LlamaForCausalLM(config).eval()
  tokens = np.random.RandomState(3).randint(0, VOCAB, (2, 96))
  ref = hf_logits(ref_model, tokens)
  ref_model.save_pretrained(tmp_path / "src", safe_serialization=True)
  model = hf.load_hf_llama(str(tmp_path / "src"))
  assert model.cfg.rope_scaling.type == rope["rope_type"]
  diff = np.abs(logits(model, tokens) - ref).max()
  print(f"{rope['rope_type']} RoPE import: max |logits - transformers| = {diff:.3g}")
  assert diff < 1e-4
  # Without the rescaling the late positions differ: the test has teeth.
  plain = hf.load_hf_llama(str(tmp_path / "src"))
  for block in plain.layers:
    block.attn.rope_scaling = type(block.attn.rope_scaling)()
  assert np.abs(logits(plain, tokens) - ref)[:, 64:].max() > 1e-2
  hf.save_hf_llama(model, tmp_path / "out", dtype="float32")
  back = hf_from_pretrained(str(tmp_path / "out"))
  diff = np.abs(hf_logits(back, tokens) - ref).max()
  print(f"{rope['rope_type']} RoPE export reloaded by transformers: max |diff| = {diff:.3g}")
  assert diff < 1e-4
