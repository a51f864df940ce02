"""Fine-tuning end to end: SparseLoRA vs dense LoRA, resume, base sources."""

import json
import os

import numpy as np
import pytest

from helpers import byte_level_tokenizer_json, smollm2_gguf, tiny_finetune_config
from lost_jax import configs
from lost_jax.recipes import base as base_lib
from lost_jax.recipes import finetune
from lost_jax.training import metrics

@pytest.mark.slow
def test_sparselora_matches_dense_lora_eval_loss(pretrained_workdir, tmp_path):
  dense = finetune.finetune_and_evaluate(tiny_finetune_config(pretrained_workdir, sparse=False),
                                         str(tmp_path / "d"), quiet=True)
  sparse = finetune.finetune_and_evaluate(tiny_finetune_config(pretrained_workdir),
                                          str(tmp_path / "s"), quiet=True)
  rows = [r["loss"] for r in metrics.read_metrics(str(tmp_path / "s")) if "loss" in r]
  assert rows[-1] < rows[0]                              # it learns
  assert 0.0 <= sparse["eval_accuracy"] <= 1.0
  assert abs(sparse["eval_loss"] - dense["eval_loss"]) <= 0.02 * dense["eval_loss"], (
      sparse["eval_loss"], dense["eval_loss"])
  # A 4-bit (NF4) base reaches the unquantised base's eval loss within 3%.
  cfg = tiny_finetune_config(pretrained_workdir)
  cfg.init.quantize = "nf4"
  nf4 = finetune.finetune_and_evaluate(cfg, str(tmp_path / "q"), quiet=True)
  assert abs(nf4["eval_loss"] - sparse["eval_loss"]) <= 0.03 * sparse["eval_loss"], (
      nf4["eval_loss"], sparse["eval_loss"])
  # the estimators were built once and stored beside the run
  assert os.path.exists(tmp_path / "s" / "estimators.npz")
  assert not os.path.exists(tmp_path / "d" / "estimators.npz")


@pytest.mark.slow
def test_finetune_resume_is_exact(pretrained_workdir, tmp_path):
  cfg = tiny_finetune_config(pretrained_workdir, steps=8)
  cfg.train.update(dict(ckpt_every=2, eval_every=8, accuracy_examples=0, log_every=1))
  finetune.finetune_and_evaluate(cfg, str(tmp_path / "a"), quiet=True)
  finetune.finetune_and_evaluate(cfg, str(tmp_path / "b"), quiet=True, stop_at=4)
  finetune.finetune_and_evaluate(cfg, str(tmp_path / "b"), quiet=True)
  losses = [[r["loss"] for r in metrics.read_metrics(str(tmp_path / k)) if "loss" in r]
            for k in "ab"]
  assert len(losses[0]) == 8 and losses[0] == losses[1]


def test_non_dense_base_and_missing_base_are_refused(tmp_path):
  cfg = tiny_finetune_config(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="config.init.path"):
    finetune.finetune_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  lost_run = tmp_path / "lost_run"
  lost_run.mkdir()
  run_cfg = configs.pretrain_config("quickstart", "lost")
  (lost_run / "config.json").write_text(run_cfg.to_json())
  cfg = tiny_finetune_config(str(lost_run))
  with pytest.raises(ValueError, match="dense base kernels"):
    finetune.finetune_and_evaluate(cfg, str(tmp_path / "run2"), quiet=True)


@pytest.mark.slow
def test_finetune_from_a_hugging_face_directory(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=256)
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf", safe_serialization=True)
  cfg = tiny_finetune_config(str(tmp_path / "hf"), steps=4)
  # A real base is never paired with an invented tokenizer: none in the directory is an error.
  with pytest.raises(ValueError, match=r"neither tokenizer\.json nor tokenizer\.model\. Fix: "
                     r"set config\.data\.tokenizer"):
    finetune.finetune_and_evaluate(cfg, str(tmp_path / "run0"), quiet=True)
  byte_level_tokenizer_json(tmp_path / "hf", 512)
  cfg = tiny_finetune_config(str(tmp_path / "hf"), steps=4)   # source auto-detected as hf
  cfg.train.update(dict(eval_every=4, accuracy_examples=4))
  out = finetune.finetune_and_evaluate(cfg, str(tmp_path / "run"), quiet=True)
  assert out["step"] == 4 and np.isfinite(out["eval_loss"])
  saved = json.load(open(tmp_path / "run" / "config.json"))
  assert saved["model"]["n_kv_heads"] == 2 and saved["model"]["d_model"] == 64
  assert saved["data"]["tokenizer"].endswith("tokenizer.json")


@pytest.mark.parametrize("source", ["pretrain", "hf"])
def test_a_bases_model_computes_as_the_runs_config_says(source, pretrained_workdir, tmp_path):
  """The base gives the architecture; model.remat and model.perf are the run's (no file holds
  them): a scanned, rematerialised fine-tune of a real base is one."""
  path = pretrained_workdir
  if source == "hf":
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "hf")
    byte_level_tokenizer_json(tmp_path / "hf", 512)
    path = str(tmp_path / "hf")
  cfg = tiny_finetune_config(path, sparse=False)
  cfg.model.remat, cfg.model.perf.layer_loop, cfg.model.perf.loss_chunk = True, "scan", 0
  model, run = finetune.base_model(cfg)
  assert model.cfg.remat is True and run.model.remat is True
  assert model.cfg.perf.layer_loop == run.model.perf.layer_loop == "scan"
  assert model.cfg.perf.loss_chunk == run.model.perf.loss_chunk == 0
  assert run.model.d_model == (96 if source == "hf" else 64)   # the base's architecture


@pytest.mark.parametrize("what", ["nothing", "empty_dir", "text_file", "mismatch"])
def test_base_kind_detection_errors_name_the_fix(tmp_path, what, pretrained_workdir):
  cfg = configs.finetune_config("quickstart")
  cfg.init.source = "auto"
  if what == "nothing":
    cfg.init.path = str(tmp_path / "nope")
  elif what == "empty_dir":
    cfg.init.path = str(tmp_path)
  elif what == "text_file":
    cfg.init.path = str(tmp_path / "x.gguf")
    (tmp_path / "x.gguf").write_text("not a gguf")
  else:
    cfg.init.path, cfg.init.source = pretrained_workdir, "hf"
  with pytest.raises(ValueError, match=r"config\.init\.(path|source)=.*Fix: "):
    base_lib.base_kind(cfg)
  cfg.init.source = "auto"
  if what == "mismatch":
    assert base_lib.base_kind(cfg) == "pretrain"


def test_base_kind_detects_gguf():
  path = smollm2_gguf()
  cfg = configs.finetune_config("smollm2_135m_gsm")
  assert cfg.init.path == path and path.endswith(".gguf")
  assert base_lib.base_kind(cfg) == "gguf"


@pytest.mark.slow
def test_zero_steps_evaluates_the_base_zero_shot(tmp_path):
  cfg = configs.finetune_config("quickstart")
  cfg.init.source = "random"
  cfg.model.update(dict(n_layers=1, d_model=32, ffn_dim=64, vocab_size=512))
  cfg.sparse.update(dict(ffn="0.5@0", attn="0.5@0"))
  cfg.data.update(dict(seq_len=64, max_prompt_len=56, train_size=64, eval_size=8,
                       max_new_tokens=4))
  cfg.train.update(dict(steps=0, batch_size=4, accuracy_examples=4))
  out = finetune.finetune_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert out["step"] == 0 and out["eval_loss"] > 5.0   # a random 512-way model: ~ln 512
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [0]
