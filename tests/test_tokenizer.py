"""lost_jax.tokenizer: HF tokenizer.json and GGUF-built tokenizers behind one interface, with ids
equal to the `tokenizers` library's."""

import json
import os
import pickle

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from helpers import reuse_gguf_parses, smollm2_gguf
from lost_jax import configs
from lost_jax.data import tokenizer as tokenizer_lib

TEXTS = ["Hello world!", "  leading spaces, 12345 digits and 3.14", "naïve café — 東京 😀",
         "x=1\n\n\tdef f():\n  return  x", "What is 17 + 25? Answer: 42"]


# ------------------------------------------------------------------- a tokenizer.json we build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A byte-level BPE trained here, saved as a HF directory with a BOS-adding post-processor
  (LLaMA-3 style: no add_bos_token in tokenizer_config.json)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = [t * 3 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog"] * 20
  tok.train_from_iterator(corpus, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  path = tmp_path_factory.mktemp("hf_tok")
  tok.save(str(path / "tokenizer.json"))
  with open(path / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}, f)
  return tok, str(path)


def test_tokenizer_json_ids_equal_the_library(built):
  lib, path = built
  tok = tokenizer_lib.from_path(path)          # the directory: tokenizer.json is found
  assert isinstance(tok, tokenizer_lib.Tokenizer) and tok.path.endswith("tokenizer.json")
  assert tok.vocab_size == lib.get_vocab_size() > 300
  for text in TEXTS:
    assert tok.encode(text) == lib.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_json_special_tokens(built):
  _, path = built
  tok = tokenizer_lib.from_path(os.path.join(path, "tokenizer.json"))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.add_bos           # read from the post-processor
  assert tok.encode("</s>") == [2]                       # special text maps to its id
  assert tok.decode([1, *tok.encode("fox"), 2]) == "fox"  # specials dropped on decode
  again = pickle.loads(pickle.dumps(tok))                 # grain workers pickle it
  assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.eos_id == 2


def test_load_tokenizer_setting_and_vocab_check(built, tmp_path):
  lib, path = built
  n = lib.get_vocab_size()
  cfg = configs.data_config()
  cfg.tokenizer = path
  assert tokenizer_lib.load_tokenizer(cfg, n).vocab_size == n
  assert tokenizer_lib.load_tokenizer(cfg, 512).vocab_size == n   # padded embedding is fine
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size=300.*Fix"):
    tokenizer_lib.load_tokenizer(cfg, 300)
  cfg.tokenizer = str(tmp_path)                  # a directory with no tokenizer in it
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer: directory.*Fix"):
    tokenizer_lib.load_tokenizer(cfg, n)


# ------------------------------------------------------------------- SmolLM2's, from its GGUF


@pytest.fixture(scope="module")
def smollm2():
  path = smollm2_gguf()
  transformers = pytest.importorskip("transformers")
  reuse_gguf_parses()   # transformers' config and tokenizer share one parse
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  return tokenizer_lib.from_path(path), ref.backend_tokenizer


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_ids_equal_transformers_conversion(smollm2):
  tok, ref = smollm2
  assert tok.vocab_size == ref.get_vocab_size() == 49152
  chat = "<|im_start|>user\nWhat is 17*23?<|im_end|>\n<|im_start|>assistant\n391<|im_end|>"
  for text in TEXTS + [chat]:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_smollm2_special_tokens(smollm2):
  tok, _ = smollm2
  # GGUF metadata: bos <|im_start|> 1, eos and pad <|im_end|> 2, no BOS added to prompts.
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
  assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
  assert tok.encode("<|endoftext|>") == [0]
  assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
  # SmolLM2 splits digits one by one.
  assert len(tok.encode("12345")) == 5
