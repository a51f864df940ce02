"""`generate`: a tiny fine-tune run whose tokenizer has a chat template, completed from Python
and from the command line; one-line errors before anything is loaded."""

import json
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, subprocess_env, tiny_finetune_config
from lost_jax.commands import generate as command
from lost_jax.data import instruct
from lost_jax.errors import UserError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer_dir(folder):
  """A byte-level BPE tokenizer.json (512 entries, ChatML's special tokens) with a chat
  template in its tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "</s>", "<|im_start|>",
                                                                "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([r["instruction"] + r["input"] + " " + r["output"] + " user assistant"
                           for r in instruct.arithmetic_records(200, 0)], trainer)
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
       "chat_template": CHATML}))
  return str(folder)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
  """A 2-step LoRA fine-tune of a random tiny base, trained with the tokenizer's template."""
  from lost_jax.recipes import finetune
  root = tmp_path_factory.mktemp("generate")
  cfg = tiny_finetune_config(None, sparse=False, steps=2)
  cfg.sparse.ffn = cfg.sparse.attn = ""
  cfg.data.tokenizer = chat_tokenizer_dir(root / "tok")
  cfg.data.template = "auto"
  cfg.train.update(dict(eval_every=2, accuracy_examples=0))
  finetune.finetune_and_evaluate(cfg, str(root / "run"), quiet=True)
  return str(root / "run")


def flags(**kw):
  base = dict(workdir=None, base=None, step=None, prompt=None, prompts_file=None,
              max_tokens=8, temperature=0.0, top_p=1.0, seed=0)
  return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.slow
def test_python_api_renders_the_template_and_stops_at_end_of_turn(chat_run):
  assert json.load(open(f"{chat_run}/config.json"))["data"]["template"] == "base"
  gen = command.load(workdir=chat_run, log=lambda line: None)
  tok = gen.tokenizer
  im_end = tok.token_id("<|im_end|>")
  assert gen.template == "base" and command.stop_ids(gen) == tuple(sorted((tok.eos_id, im_end)))
  ids = command.prompt_ids(gen, "Ada has 3 pens.")
  assert ids == tok.encode("<|im_start|>user\nAda has 3 pens.<|im_end|>\n"
                           "<|im_start|>assistant\n")
  # Make the model write <|im_end|> where it wrote its first token (swap the two LM-head
  # columns): its answer is then that token followed by padding (decoding stopped), and the
  # text is empty.
  first = int(command.generate_ids(gen, ["Ada has 3 pens."], max_tokens=5)[0][0])
  kernel = np.array(gen.model.lm_head.kernel[...])
  kernel[:, [first, im_end]] = kernel[:, [im_end, first]]
  gen.model.lm_head.kernel[...] = jnp.asarray(kernel)
  row = command.generate_ids(gen, ["Ada has 3 pens."], max_tokens=5)[0]
  assert row.tolist() == [im_end] + [tok.pad_id] * 4
  assert command.complete(gen, ["Ada has 3 pens."], max_tokens=5) == [""]


@pytest.mark.slow
def test_cli_prints_a_completion(chat_run, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "Ada has 3 pens."}) + "\n" + json.dumps(
      {"messages": [{"role": "user", "content": "Ben has 2 cards."},
                    {"role": "assistant", "content": "2"}]}) + "\n")
  proc = subprocess.run([sys.executable, "-m", "lost_jax.main", "generate",
                         f"--workdir={chat_run}", f"--prompts_file={prompts}", "--max_tokens=4",
                         "--temperature=0.8", "--top_p=0.9", "--seed=1"],
                        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "loaded step 2 of" in out and "[1/2] Ada has 3 pens.\n>>> " in out
  assert "[2/2] Ben has 2 cards.\n>>> " in out and "done: prompts 2" in out
  assert "prompt/s" in proc.stderr or "new tok/s" in proc.stderr    # the progress bar


def test_errors_are_one_line_before_loading(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(json.dumps(
      {"model": {"linear": {"kind": "dense"}}, "train": {}, "lora": {}, "init": {}}))
  cases = [
      (dict(workdir=str(tmp_path / "none"), prompt=["x"]), "is not a lost_jax run"),
      (dict(workdir=str(tmp_path / "run"), prompt=["x"]), "has no checkpoint yet"),
      (dict(base=str(tmp_path / "none"), prompt=["x"]), "does not exist"),
      (dict(base=str(tmp_path / "run" / "config.json"), prompt=["x"]), "none of the models"),
      (dict(workdir=str(tmp_path / "run"), prompts_file=str(tmp_path / "p.txt")),
       "p.txt does not exist"),
      (dict(workdir=str(tmp_path / "run"), prompt=["x"], top_p=0.0), "top_p"),
      (dict(workdir=str(tmp_path / "run"), prompt=["x"], max_tokens=0), "max_tokens"),
  ]
  for kw, match in cases:
    with pytest.raises(UserError, match=match):
      command.main(flags(**kw))
  (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(UserError, match=r"no checkpoint of step 3 \(it has 4\)"):
    command.main(flags(workdir=str(tmp_path / "run"), prompt=["x"], step=3))
  (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"question": "b"}\n')
  with pytest.raises(UserError, match="p.jsonl line 2: no prompt"):
    command.read_prompts(None, str(tmp_path / "p.jsonl"))
  (tmp_path / "p.txt").write_text("first\n\nsecond\n")
  assert command.read_prompts(None, str(tmp_path / "p.txt")) == ["first", "second"]


@pytest.mark.slow
def test_a_lost_pretraining_run_loads_at_the_chosen_step(tmp_path):
  """--workdir of a pre-training run (LOST: frozen channel indices beside the parameters):
  the model holds that step's parameters, and prompts are plain text (no chat template)."""
  import jax
  from flax import nnx

  import helpers
  from lost_jax.recipes import pretrain
  workdir = str(tmp_path / "pt")
  pretrain.train_and_evaluate(helpers.pipeline_config(steps=4), workdir, quiet=True)
  gen = command.load(workdir=workdir, step=2, log=lambda line: None)
  _, state = helpers.saved_state(workdir, 2)
  got = jax.tree.leaves(nnx.to_pure_dict(nnx.state(gen.model, nnx.Param)))
  want = jax.tree.leaves(state["params"])
  assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
  assert gen.template == command.RAW
  assert command.prompt_ids(gen, "x = 1") == gen.tokenizer.encode("x = 1")
  assert len(command.complete(gen, ["def f(x):"], max_tokens=3)) == 1
