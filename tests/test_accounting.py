"""Parameter, FLOP and memory accounting against hand-derived closed forms and the built model."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from flax import nnx

from helpers import tiny_model_config
from lost_jax import configs
from lost_jax.training import accounting
from lost_jax.training import optim
from lost_jax.layers.linear import StaticIndices
from lost_jax.models.llama import Llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
# Published LLaMA sizes in millions and the decimals they are quoted to.
PUBLISHED_M = {"llama_60m": (58.07, 2), "llama_130m": (134.1, 1), "llama_350m": (367.97, 2),
               "llama_1b": (1339.08, 2), "llama_7b": (6738.4, 1)}


def full_rank_closed_form(v, d, f, n_layers, d_kv):
  """2VD + L(2D^2 + 2 D D' + 3DF + 2D) + D: embed + head, q/o + k/v, MLP, two norms, final norm."""
  return 2 * v * d + n_layers * (2 * d * d + 2 * d * d_kv + 3 * d * f + 2 * d) + d


@pytest.mark.parametrize("size", PRESETS)
def test_full_rank_params_match_closed_form_and_published(size):
  model = configs.model_config(size)
  counts = accounting.count_params(model)
  expected = full_rank_closed_form(model.vocab_size, model.d_model, model.ffn_dim,
                                   model.n_layers, model.d_model)
  assert counts["total"] == expected
  assert counts["trainable"] == expected
  assert counts["static_indices"] == 0
  published, decimals = PUBLISHED_M[size]
  assert round(counts["total"] / 1e6, decimals) == published


def test_gqa_uses_kv_width():
  model = configs.model_config("llama_60m")
  model.n_kv_heads = 2                              # head dim 64 -> k/v width 128
  assert accounting.count_params(model)["total"] == full_rank_closed_form(
      32000, 512, 1376, 8, 128)


def test_lost_llama_60m_by_hand():
  model = configs.pretrain_config("llama_60m", "lost").model
  # r = 128; k = ceil(0.01 n): 6 for n = 512, 14 for n = 1376.
  qkvo = 4 * (128 * (512 + 512) + 6 * 512)
  gate_up = 2 * (128 * (512 + 1376) + 6 * 1376)
  down = 128 * (1376 + 512) + 14 * 512
  per_layer = qkvo + gate_up + down
  counts = accounting.count_params(model)
  assert counts["projections"] == 8 * per_layer
  assert counts["layers"] == 8 * (per_layer + 2 * 512)
  assert counts["embeddings"] == counts["lm_head"] == 32000 * 512
  assert counts["final_norm"] == 512
  assert counts["total"] == 2 * 32000 * 512 + 8 * (per_layer + 1024) + 512
  assert counts["static_indices"] == 8 * (6 * 6 + 14)


def test_linear_counts_small_cases():
  lin = configs.linear_config("lost", rank=8)
  lin.sparsity, lin.density = 0.05, 0.03
  n, m = 100, 40                                    # k = 5; SLTrain nnz = 120
  assert accounting.linear_params("dense", n, m, lin) == 4000
  assert accounting.linear_params("lost", n, m, lin) == 8 * 140 + 5 * 40
  assert accounting.linear_params("low_rank", n, m, lin) == 8 * 140
  assert accounting.linear_params("cola", n, m, lin) == 8 * 140
  assert accounting.linear_params("sltrain", n, m, lin) == 8 * 140 + 120
  assert accounting.linear_flops("dense", n, m, lin) == 8000
  assert accounting.linear_flops("lost", n, m, lin) == 2 * 8 * 140 + 2 * 5 * 40
  assert accounting.linear_flops("cola", n, m, lin) == 2 * 8 * 140
  assert accounting.linear_flops("sltrain", n, m, lin) == 8000
  with pytest.raises(ValueError, match="unknown"):
    accounting.linear_params("lora", n, m, lin)


@pytest.mark.parametrize("size", configs.SIZES)
def test_matched_baselines_within_one_percent_of_lost(size):
  lost = accounting.count_params(configs.pretrain_config(size, "lost").model)["projections"]
  for method in ("low_rank", "cola", "sltrain"):
    got = accounting.count_params(configs.pretrain_config(size, method).model)["projections"]
    assert abs(got - lost) / lost < 0.01, (size, method, got, lost)


@pytest.mark.parametrize("method", configs.METHODS)
def test_counts_equal_built_model(method):
  cfg = configs.pretrain_config("quickstart", method)
  model = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  indices = nnx.as_pure(nnx.state(model, StaticIndices))
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  counts = accounting.count_params(cfg.model)
  assert size(params) == counts["total"]
  assert size(indices) == counts["static_indices"]
  # Optimizer state as optax actually allocates it (scalar step counters excluded).
  state = jax.eval_shape(optim.make_optimizer(cfg.train, params).init, params)
  entries = sum(math.prod(x.shape) for x in jax.tree.leaves(state) if x.ndim)
  assert entries == accounting.optimizer_state_entries(cfg)


def test_flops_llama_60m_by_hand():
  attn = 4 * 256 * 512                              # QK^T + AV, full attention, seq 256
  head = 2 * 512 * 32000
  dense = 2 * (4 * 512 * 512 + 3 * 512 * 1376)
  cfg = configs.pretrain_config("llama_60m", "full_rank")
  assert accounting.forward_flops_per_token(cfg.model, 256) == 8 * (dense + attn) + head
  assert accounting.train_flops_per_token(cfg.model, 256) == 3 * (8 * (dense + attn) + head)
  lost = 2 * (4 * (128 * 1024 + 6 * 512) + 2 * (128 * 1888 + 6 * 1376) + 128 * 1888 + 14 * 512)
  cfg = configs.pretrain_config("llama_60m", "lost")
  assert accounting.forward_flops_per_token(cfg.model, 256) == 8 * (lost + attn) + head
  cfg = configs.pretrain_config("llama_60m", "cola")
  r = cfg.model.linear.rank
  low = 2 * r * (4 * 1024 + 3 * 1888)
  assert accounting.forward_flops_per_token(cfg.model, 256) == 8 * (low + attn) + head
  cfg = configs.pretrain_config("llama_60m", "sltrain")   # dense matmul on the merged kernel
  assert accounting.forward_flops_per_token(cfg.model, 256) == 8 * (dense + attn) + head
  assert accounting.forward_flops_per_token(cfg.model, 512) == 8 * (dense + 2 * attn) + head


def tiny_model(kind: str) -> ml_collections.ConfigDict:
  model = tiny_model_config(kind, rank=2, vocab_size=10, d_model=8, ffn_dim=12, n_heads=2,
                            n_kv_heads=1)
  model.linear.sparsity = 0.25                      # k = 2 for n = 8, 3 for n = 12
  model.linear.density = 0.25
  model.linear.activation = "identity" if kind == "low_rank" else "silu"   # as the presets
  return model


def test_activation_bytes_by_hand():
  seqs, seq_len, c = 3, 4, 2
  tokens = seqs * seq_len
  # Block entries per token: norms 4*8, q and attention output 2*8, k and v 2*4, MLP 3*12.
  dense_entries = 32 + 16 + 8 + 36
  probs = 2 * seq_len * (4 + 2)                     # H * seq_len * (f32 + bf16 copy)
  head = 2 * 2 * 8 + 4 * 2 * 10
  model = tiny_model("dense")
  assert accounting.activation_bytes(model, seqs, seq_len, c) == (
      2 * (c * dense_entries + probs) * tokens + head * tokens)
  # LOST with SiLU: z and silu(z) (2r = 4) plus k gathered inputs per projection.
  lost_extra = 6 * (4 + 2) + (4 + 3)
  model = tiny_model("lost")
  block = (c * (dense_entries + lost_extra) + probs) * tokens
  assert accounting.activation_bytes(model, seqs, seq_len, c) == 2 * block + head * tokens
  model.remat = True                                # keep block inputs; recompute one block
  assert accounting.activation_bytes(model, seqs, seq_len, c) == (
      2 * c * 8 * tokens + block + head * tokens)
  model = tiny_model("low_rank")                    # identity: only z (r = 2) per projection
  assert accounting.activation_bytes(model, seqs, seq_len, c) == (
      2 * (c * (dense_entries + 7 * 2) + probs) * tokens + head * tokens)
  model = tiny_model("sltrain")                     # plus its merged kernels, once per block
  kernels = c * (2 * 8 * 8 + 2 * 8 * 4 + 2 * 8 * 12 + 12 * 8)
  assert accounting.activation_bytes(model, seqs, seq_len, c) == (
      2 * ((c * dense_entries + probs) * tokens + kernels) + head * tokens)
  # float32 compute keeps one float32 copy of the probabilities.
  model = tiny_model("dense")
  assert accounting.activation_bytes(model, seqs, seq_len, 4) == (
      2 * (4 * dense_entries + 2 * seq_len * 4) * tokens + (4 * 2 * 8 + 4 * 2 * 10) * tokens)


def test_galore_optimizer_entries_llama_60m_by_hand():
  cfg = configs.pretrain_config("llama_60m", "galore")
  # r = 128: moments r * min(n, m) twice, projector r * max(n, m).
  square = 3 * 128 * 512
  wide = 2 * 128 * 512 + 128 * 1376
  projected = 8 * (4 * square + 3 * wide)
  rest = 2 * (2 * 32000 * 512 + 8 * 2 * 512 + 512)   # AdamW on embeddings, head and norms
  assert accounting.optimizer_state_entries(cfg) == projected + rest


def test_memory_components_and_precisions():
  for method in configs.METHODS:
    mem = accounting.memory_estimate(configs.pretrain_config("llama_1b", method))
    assert all(v > 0 for v in mem.values()), (method, mem)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
  cfg = configs.pretrain_config("llama_1b", "lost")
  counts = accounting.count_params(cfg.model)
  mem = accounting.memory_estimate(cfg)
  assert mem["weights"] == 4 * counts["total"] + 4 * counts["static_indices"]
  assert mem["gradients"] == 4 * counts["total"]
  assert mem["optimizer"] == 2 * 4 * counts["total"]
  cfg.train.precision = "pure_bf16"
  bf16 = accounting.memory_estimate(cfg)
  assert bf16["gradients"] * 2 == mem["gradients"]
  assert bf16["activations"] == mem["activations"]  # both compute in bf16
  cfg.train.microbatches = 4                        # activations are per accumulation pass
  assert accounting.memory_estimate(cfg)["activations"] == accounting.activation_bytes(
      cfg.model, 128, 256, 2)
  cfg.train.precision = "fp8"
  with pytest.raises(ValueError, match="precision"):
    accounting.memory_estimate(cfg)


def test_lost_uses_less_memory_than_full_rank_at_1b():
  full = configs.pretrain_config("llama_1b", "full_rank")
  lost = configs.pretrain_config("llama_1b", "lost")
  m_full, m_lost = accounting.memory_estimate(full), accounting.memory_estimate(lost)
  for key in ("weights", "gradients", "optimizer"):
    assert m_lost[key] < 0.5 * m_full[key]
  # The rank-r intermediates make LOST's activations larger per token; at the full 512-sequence
  # pass without remat they outweigh the state savings, so compare at realistic passes.
  assert m_lost["activations"] > m_full["activations"]
  for cfg in (full, lost):
    cfg.model.remat = True
  assert accounting.memory_estimate(lost)["total"] < accounting.memory_estimate(full)["total"]
  for cfg in (full, lost):
    cfg.model.remat, cfg.train.microbatches = False, 64      # 8 sequences per pass
  assert accounting.memory_estimate(lost)["total"] < accounting.memory_estimate(full)["total"]


def test_compare_rows_share_run_settings():
  like = configs.pretrain_config("llama_130m", "lost")
  like.train.microbatches = 8
  rows = accounting.compare("llama_130m", like=like)
  assert [r["method"] for r in rows] == list(configs.METHODS)
  assert {r["tokens_per_pass"] for r in rows} == {64 * 256}
  assert rows[0]["params"]["total"] == accounting.count_params(
      configs.model_config("llama_130m"))["total"]


def test_import_defines_no_flags():
  from absl import flags
  assert "compare" not in flags.FLAGS


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lost_jax.training.accounting", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_cli_compare_prints_every_method():
  out = _cli("--config=configs/pretrain.py:llama_1b,lost", "--compare")
  for method in configs.METHODS:
    assert f"llama_1b,{method} " in out
  assert "1339.08" in out


@pytest.mark.slow
def test_cli_single_run():
  out = _cli("--config=configs/pretrain.py:llama_60m,lost")
  assert "llama_60m,lost" in out and "params:" in out
  total = accounting.count_params(configs.pretrain_config("llama_60m", "lost").model)["total"]
  assert f"total {total:,}" in out


@pytest.mark.parametrize("method", configs.METHODS)
def test_8bit_state_bytes_equal_allocated(method):
  cfg = configs.pretrain_config("quickstart", method)
  cfg.train.optimizer = "galore8bit" if method == "galore" else "adamw8bit"
  model = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = jax.eval_shape(optim.make_optimizer(cfg.train, params).init, params)
  # Scalars (step counters, the unused scale of an unquantised moment) are not counted.
  allocated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim)
  assert allocated == accounting.optimizer_state_bytes(cfg)
  assert accounting.optimizer_state_entries(cfg) == accounting.optimizer_state_entries(
      configs.pretrain_config("quickstart", method))


def test_8bit_moment_bytes_by_hand():
  assert accounting.eight_bit_moment_bytes((2048, 5461), 4) == 2048 * 5461 + 4 * 2048 * 22
  assert accounting.eight_bit_moment_bytes((2048,), 4) == 4 * 2048       # < 4096: float32
  cfg = configs.pretrain_config("llama_1b", "full_rank")
  full = accounting.optimizer_state_bytes(cfg)
  cfg.train.optimizer = "adamw8bit"
  eight = accounting.optimizer_state_bytes(cfg)
  assert 0.25 < eight / full < 0.26        # 1 byte + 4/256 per value vs 4 bytes


def test_nf4_base_bytes_equal_the_quantised_model():
  from lost_jax.adapters.lora import quantize_base
  assert accounting.nf4_kernel_bytes(4096, 14336) == 4096 * 224 * (32 + 4)
  cfg = configs.finetune_config("quickstart")
  cfg.model.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
  def build(quantize):
    return nnx.eval_shape(lambda: quantize_base(Llama(cfg.model, rngs=nnx.Rngs(0)), quantize))
  for quantize in ("none", "nf4"):
    params = nnx.as_pure(nnx.state(build(quantize), nnx.Param))
    held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert held == accounting.base_weight_bytes(cfg.model, quantize, 2), quantize


def test_compare_says_why_lost_needs_more_memory_and_shows_the_micro_batched_totals():
  cfg = configs.pretrain_config("llama_1b", "lost")
  rows = accounting.compare("llama_1b", like=cfg)
  why, lost, micro = accounting.explain_compare(rows, cfg)
  full = accounting.memory_estimate(configs.pretrain_config("llama_1b", "full_rank"))
  gib = lambda b: f"{b / 2 ** 30:.2f}"
  assert (f"activations dominate: {gib(full['activations'])} of {gib(full['total'])} GiB for "
          "full_rank") in why and "131,072 tokens of one pass" in why and "without remat" in why
  lost_mem = accounting.memory_estimate(cfg)
  assert f"keeps {gib(lost_mem['activations'] - full['activations'])} GiB more" in lost
  totals = {}
  for method in configs.METHODS:
    one = configs.pretrain_config("llama_1b", method)
    one.train.microbatches = 16
    totals[method] = gib(accounting.memory_estimate(one)["total"])
  assert micro.endswith(" | ".join(f"{m} {t}" for m, t in totals.items())), micro
  assert float(totals["lost"]) < float(totals["full_rank"])


def test_a_tied_base_is_counted_once_with_the_head_copy_named():
  cfg = configs.finetune_config("gemma3_270m_gsm")
  cfg.init.path = ""          # the preset's architecture alone; the file is not read here
  line = accounting.finetune_base_line(cfg, tied=True)
  # transformers' Gemma3ForCausalLM of the same GGUF: 268,098,176 parameters (test_gemma3)
  assert "frozen base 268.1M parameters (embedding and head tied" in line, line
  assert "435.9M in memory" in line    # + the 262144 x 640 head lost_jax holds as a copy
  assert "frozen base 435.9M parameters |" in accounting.finetune_base_line(cfg, tied=False)
  p = accounting.count_params(cfg.model)
  assert p["total"] - p["lm_head"] == 268_098_176


def test_the_base_kind_and_its_tie_are_read_from_what_the_path_holds(tmp_path):
  from lost_jax.formats import bases   # pylint: disable=g-import-not-at-top
  def hf_dir(name, **config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)
  tied, untied = hf_dir("tied", tie_word_embeddings=True), hf_dir("untied")
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
  (tmp_path / "junk.bin").write_bytes(b"GGML....")
  assert [bases.base_kind(p) for p in (tied, untied, str(run), str(tmp_path / "junk.bin"),
                                       str(tmp_path / "none"))] == ["hf", "hf", "pretrain",
                                                                    None, None]
  assert [accounting._base_ties_embeddings(p) for p in (tied, untied, str(run))] == [
      True, False, False]
  assert bases.hf_config(tied)["tie_word_embeddings"] is True


def test_device_memory_estimate_splits_the_state_and_counts_one_devices_rows():
  cfg = configs.pretrain_config("llama_7b", "full_rank")     # mixed: 4-byte state, bf16 compute
  cfg.train.microbatches = 4
  n = accounting.count_params(cfg.model)["total"]             # dense: every parameter trains
  mem = accounting.device_memory_estimate(cfg, data=2, fsdp=16, tensor=2)
  # fsdp x tensor = 32 shards of the state; the f32 accumulator (4 passes) joins the gradients;
  # 512 rows / 4 passes / (2 x 16) batch shards = 4 rows per device per pass.
  assert mem["weights"] == 4 * n // 32
  assert mem["gradients"] == (4 * n + 4 * n) // 32
  assert mem["optimizer"] == 8 * n // 32
  assert mem["activations"] == accounting.activation_bytes(cfg.model, 4, 256, 2)
  cfg.model.perf.layer_loop = "scan"           # + the stacked copy of the blocks' w and grads
  layers = accounting.count_params(cfg.model)["layers"]
  scanned = accounting.device_memory_estimate(cfg, data=2, fsdp=16, tensor=2)
  assert scanned["gradients"] == (8 * n + 8 * layers) // 32
  cfg.train.microbatches = 1
  one = accounting.device_memory_estimate(cfg, data=1, fsdp=1, tensor=1)
  whole = accounting.memory_estimate(cfg)
  assert one["total"] == whole["total"] + 8 * layers          # 1 device: the paper's figure
  with pytest.raises(ValueError, match="multiple of 1024"):
    accounting.device_memory_estimate(cfg, data=4, fsdp=256, tensor=1)
