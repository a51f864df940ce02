"""Model families (Qwen2, Qwen3, Mistral, Gemma 3) as settings of the one decoder: HF import
and export checked against transformers' own models (float32, random tiny weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lost_jax import configs
from lost_jax.errors import UserError
from lost_jax.formats import hf
from lost_jax.models.llama import Llama
from lost_jax.training import accounting

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, WINDOW = 96, 24, 5
TOKENS_BxL = np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=64)


def hf_family_config(family: str):
  """A tiny transformers config of the family that uses each of its features: GQA with one kv
  head, Qwen2's biases (tied), Qwen3's head_dim 16 != 32 / 4, Mistral's window of 5 on 24
  tokens, Gemma 3's local:global pattern with two RoPE bases and its attention scale."""
  if family == "qwen2":
    return transformers.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True,
                                    rope_theta=20_000.0, **SHAPE)
  if family == "qwen3":
    return transformers.Qwen3Config(num_hidden_layers=2, head_dim=16, **SHAPE)
  if family == "mistral":
    return transformers.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SHAPE)
  return transformers.Gemma3TextConfig(
      num_hidden_layers=3, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
      **SHAPE)


def random_hf_model(family: str):
  """The family's CausalLM with every parameter random (biases, norms around their unit)."""
  torch.manual_seed(0)
  config = hf_family_config(family)
  config._attn_implementation = "eager"    # pylint: disable=protected-access
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  unit = 0.0 if family == "gemma3_text" else 1.0   # Gemma's norms scale by (1 + w)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.2)
      if "norm" in name:
        p.add_(unit)
  return model


def hf_logits(model, tokens=TOKENS_BxL):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@nnx.jit
def _forward(model, tokens_BxL):
  return model(tokens_BxL)


def logits(model, tokens=TOKENS_BxL):
  return np.asarray(_forward(model, jnp.asarray(tokens)))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3_text"])
def test_family_import_and_export_match_transformers(family, tmp_path):
  ref_model = random_hf_model(family)
  ref = hf_logits(ref_model)
  ref_model.save_pretrained(tmp_path / "hf")
  model = hf.load_hf_llama(str(tmp_path / "hf"))
  arch = configs.Arch.of(model.cfg)
  assert arch.family == family
  got = logits(model)
  print(family, "max |logit|", np.abs(ref).max(), "max |diff|", np.abs(got - ref).max())
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  counts = accounting.count_params(model.cfg)      # HF counts a tied embedding once
  tied = ref_model.config.tie_word_embeddings
  assert counts["total"] - tied * counts["lm_head"] == sum(
      p.numel() for p in ref_model.parameters())

  hf.save_hf_llama(model, str(tmp_path / "out"), dtype="float32")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           dtype=torch.float32).eval()
  assert type(back) is type(ref_model)
  np.testing.assert_allclose(hf_logits(back), ref, atol=1e-4, rtol=0)

  if arch.sliding_window:
    # The window matters past position WINDOW: the same weights without it differ there,
    # so the parity above checks the local layers' mask.
    for block in model.layers:
      block.attn.sliding_window = 0
    unwindowed = logits(model)
    np.testing.assert_allclose(unwindowed[:, :WINDOW], ref[:, :WINDOW], atol=1e-4, rtol=0)
    assert np.abs(unwindowed[:, WINDOW:] - ref[:, WINDOW:]).max() > 1e-2
    for block in model.layers:
      block.attn.sliding_window = WINDOW
    # The other kernel, and (Gemma 3's mixed local/global layers) the scanned layer loop
    # whose per-layer flags are traced, honour the window too.
    model.cfg.perf.attention = "dot_product_attention"
    model.cfg.perf.attention_impl = "xla"
    if family == "gemma3_text":
      model.cfg.perf.layer_loop = "scan"
    np.testing.assert_allclose(logits(model), ref, atol=1e-4, rtol=0)


def test_unknown_families_and_features_are_refused_in_one_line():
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4)
  for hf_dict, field in ((dict(base, model_type="phi3"), "model_type"),
                         (dict(base, model_type="gemma3_text", final_logit_softcapping=30.0),
                          "final_logit_softcapping"),
                         (dict(base, model_type="qwen3", attention_bias=True),
                          "attention_bias")):
    with pytest.raises(UserError, match=f"{field}=.*Fix: ") as e:
      hf._config_from_hf(hf_dict, "config.json")
    assert "\n" not in str(e.value)
  cfg, _ = hf._config_from_hf(dict(base, model_type="qwen3"), "config.json")
  cfg.family = "llama"      # Qwen3's q/k norms have no place in a LLaMA config.json
  with pytest.raises(UserError, match="model.qk_norm=True has no place in a llama"):
    hf.hf_config(cfg)


def family_model(family: str):
  """The random tiny HF model of the family, imported from memory (`hf.load_hf_tensors`)."""
  ref = random_hf_model(family)
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  return hf.load_hf_tensors(ref.config.to_dict(), tensors, tensors.__getitem__), ref


def masked_copy(model, indices):
  """The model with every base kernel (and q/k/v bias) cut to the channels SparseLoRA kept:
  q/k/v and gate/up output columns, o and down input rows (SparseLoRA's definition)."""
  model = nnx.clone(model)

  def mask(idx, n):
    return jnp.zeros((n,), jnp.float32).at[idx].set(1.0)

  for block, idx in zip(model.layers, indices):
    attn, mlp = block.attn, block.mlp
    for name in ("q", "k", "v"):
      lin = getattr(attn, name)
      m = mask(getattr(idx["attn"], name), lin.out_features)
      lin.kernel.set_value(lin.kernel[...] * m[None, :])
      bias = getattr(attn, f"{name}_bias")
      if bias is not None:
        bias.set_value(bias[...] * m)
    rows = mask(idx["attn"].o, attn.o.in_features)
    attn.o.kernel.set_value(attn.o.kernel[...] * rows[:, None])
    m = mask(idx["ffn"], mlp.gate.out_features)
    for lin in (mlp.gate, mlp.up):
      lin.kernel.set_value(lin.kernel[...] * m[None, :])
    mlp.down.kernel.set_value(mlp.down.kernel[...] * m[:, None])
  return model


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_lora_and_sparselora_run_on_family_models(family, tmp_path):
  """GQA with one kv head: SparseLoRA's restricted forward equals the dense forward of the
  channel-masked model (biases cut with their columns, the family's FFN activation), LoRA
  gradients flow through it, and the merged model exports to transformers."""
  from helpers import randomize_lora   # pylint: disable=g-import-not-at-top
  from lost_jax.adapters import lora
  from lost_jax.adapters.sparselora import estimator as sl_estimator
  from lost_jax.adapters.sparselora import model as sl
  from lost_jax.adapters.sparselora import plan as sl_plan

  model, _ = family_model(family)
  n = len(model.layers)
  lora.apply_lora(model, ("q", "k", "v", "o", "gate", "up", "down"), rank=4, alpha=8.0,
                  rngs=nnx.Rngs(1))
  randomize_lora(model)
  est = sl_estimator.build_estimators(model, rank=4)
  plan = sl_plan.SparsityPlan.from_layers(n, 0.5, f"0-{n - 1}", 0.5, f"0-{n - 1}")
  tokens = TOKENS_BxL[:, :12]
  sparse, indices = nnx.jit(lambda m, t: sl.forward(m, t, est, plan, 0, return_indices=True)
                            )(model, jnp.asarray(tokens))
  np.testing.assert_allclose(sparse, logits(masked_copy(model, indices), tokens), atol=1e-4,
                             rtol=0)
  assert np.abs(np.asarray(sparse) - logits(model, tokens)).max() > 1e-2   # it restricted

  if family == "gemma3_text":   # one family pays for compiling the backward
    sparse_lora_step_grads_are_finite(model, tokens, est, plan)

  lora.merge_lora(model)
  hf.save_hf_llama(model, str(tmp_path / "merged"), dtype="float32")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                           dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_logits(back), logits(model), atol=1e-4, rtol=0)


def sparse_lora_step_grads_are_finite(model, tokens, est, plan):
  """LoRA gradients through SparseLoRA's restricted forward: every adapter gets a finite,
  non-zero one."""
  from lost_jax.adapters import lora   # pylint: disable=g-import-not-at-top
  from lost_jax.adapters.sparselora import model as sl   # pylint: disable=g-import-not-at-top
  graphdef, params, rest = nnx.split(model, lora.LoRAParam, ...)

  def loss(params):
    return jnp.mean(sl.forward(nnx.merge(graphdef, params, rest), jnp.asarray(tokens), est,
                               plan, 0) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert len(leaves) == 2 * 7 * len(model.layers) and all(np.isfinite(g).all() for g in leaves)
  assert all(np.abs(g).max() > 0 for g in leaves)


@pytest.mark.parametrize("size", configs.FAMILY_SIZES)
def test_family_pretraining_presets_build_and_count(size):
  """Each family-shaped LOST preset builds (abstractly) with the parameters accounting counts;
  the Gemma 3 one (GeGLU, 5 local : 1 global, two RoPE bases) takes a finite LOST step."""
  cfg = configs.pretrain_config(size, "lost")
  configs.validate_pretrain(cfg)
  model = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n == accounting.count_params(cfg.model)["total"]
  if size != "gemma3_quickstart":
    return
  # Smaller, and scanned: one block compiled, its local/global flag a scanned input.
  cfg.model.update(dtype="float32", vocab_size=VOCAB, d_model=64, ffn_dim=96)
  cfg.model.perf.layer_loop = "scan"
  model = Llama(cfg.model, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, 80)))   # > window 64

  def loss(m):
    logp = jax.nn.log_softmax(m(tokens[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert np.isfinite(float(value)) and all(np.isfinite(g).all() for g in leaves)
  assert abs(float(value) - np.log(VOCAB)) < 1.0
