"""Instruction fine-tuning data: records, prompt templates, left-padded batches, built-in tasks.

Records come in three forms: chats ({"messages": [{"role", "content"}, ...]}), Alpaca
({"instruction", "input", "output"}) and {"prompt", "completion"}. `data.template=base` renders
them with the base's own chat template (`data/chat.py`; `auto`, the default, does so whenever
the tokenizer has one); `alpaca`, `plain` and `chatml` are hand-written single-turn templates.
Loss weight 1 falls on the answer only: every assistant turn (its end-of-turn token included)
of a chat, the output (and EOS) of the others. Rows are LEFT padded so every row's answer
tokens sit in a suffix of the sequence: SparseLoRA computes that suffix densely and the
context before it sparsely.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import re

import grain
import numpy as np

from lost_jax.configs.choices import TEMPLATES
from lost_jax.data import chat
from lost_jax.data.batch import KEYS, ProcessRows, stack_rows
from lost_jax.errors import UserError

PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
          "further context. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
# A short template for small built-in tasks, where Alpaca's preamble would dominate.
PLAIN = "{instruction}\n{input}\nAnswer: "
# ChatML as SmolLM2-Instruct's chat template renders one user turn (its default system turn
# included); the answer then ends with <|im_end|>, the tokenizer's EOS.
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n<|im_start|>user\n{instruction}\n{input}<|im_end|>\n"
          "<|im_start|>assistant\n")
HAND_WRITTEN = ("alpaca", "plain", "chatml")
TASKS = ("arithmetic", "gsm", "files")
_FORMS = ('{"messages": [{"role": ..., "content": ...}, ...]}, '
          '{"instruction", "input" (optional), "output"} or {"prompt", "completion"}')


def is_chat(messages) -> bool:
  """A non-empty list of {"role": str, "content": str} messages."""
  return isinstance(messages, list) and bool(messages) and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"),
                                                                               str)
      for m in messages)


def user_text(record: dict) -> str:
  """Alpaca's instruction and input (if any) as one user message, joined by a newline."""
  return "\n".join(x for x in (record["instruction"], record.get("input") or "") if x)


def record_form(record) -> str | None:
  """'chat', 'alpaca' or 'completion' (see the module docstring), or None for no known form."""
  if not isinstance(record, dict):
    return None
  messages = record.get("messages")
  if is_chat(messages) and any(m["role"] == "assistant" for m in messages):
    return "chat"
  if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
    return "alpaca"
  if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
    return "completion"
  return None


def to_messages(record: dict) -> list[dict]:
  """The record as a chat: Alpaca's instruction and input (joined by a newline) or the prompt
  as the user turn, the output or completion as the assistant turn."""
  form = record_form(record)
  if form == "chat":
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  if form == "alpaca":
    return [{"role": "user", "content": user_text(record)},
            {"role": "assistant", "content": record["output"]}]
  return [{"role": "user", "content": record["prompt"]},
          {"role": "assistant", "content": record["completion"]}]


def to_alpaca(record: dict) -> dict:
  """The record as {instruction, input, output} for a hand-written template (a chat must be
  one user turn then one assistant turn)."""
  form = record_form(record)
  if form == "alpaca":
    return record
  if form == "completion":
    return {"instruction": record["prompt"], "input": "", "output": record["completion"]}
  roles = [m["role"] for m in record["messages"]]
  if roles != ["user", "assistant"]:
    raise UserError(f"a chat record with turns {roles} cannot be rendered by a hand-written "
                    "template (one user turn, then one assistant turn). Fix: "
                    "--config.data.template=base (a base whose tokenizer has a chat template)")
  return {"instruction": record["messages"][0]["content"], "input": "",
          "output": record["messages"][1]["content"]}


def prompt_messages(record: dict) -> list[dict]:
  """The chat up to (not including) its last assistant turn: what a generation continues."""
  messages = to_messages(record)
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return messages[:last]


def reference(record: dict) -> str:
  """The reference answer: the last assistant turn, the output or the completion."""
  return to_messages(record)[len(prompt_messages(record))]["content"]


def resolve_template(template: str, tok) -> str:
  """data.template with `auto` decided: `base` when the tokenizer has a chat template, else
  `alpaca`; `base` without one is refused in one line."""
  if template not in TEMPLATES:
    raise UserError(f"config.data.template={template!r} is unknown. Fix: one of {TEMPLATES}.")
  has = bool(getattr(tok, "chat_template", ""))
  if template == "auto":
    return "base" if has else "alpaca"
  if template == "base" and not has:
    raise UserError(f"config.data.template=base but the tokenizer {tok.path or tok.name!r} "
                    "has no chat template. Fix: --config.data.template=alpaca (or plain, "
                    "chatml), or a base whose tokenizer_config.json / GGUF holds one")
  return template


@functools.lru_cache(maxsize=8)
def _chat_template(source: str, bos: str, eos: str) -> chat.ChatTemplate:
  return chat.ChatTemplate(source, bos, eos)


def chat_template(tok) -> chat.ChatTemplate:
  """The tokenizer's ChatTemplate (one object per template, so its end of turn is read once)."""
  found = chat.template_of(tok)
  if found is None:
    raise UserError("data.template=base needs a tokenizer with a chat template. Fix: "
                    "--config.data.template=alpaca|plain|chatml")
  return _chat_template(found.source, found.bos_token, found.eos_token)


def stop_ids(tok, template: str) -> tuple[int, ...]:
  """The ids that end an answer under `template`: EOS, and the chat template's end of turn."""
  return chat.stop_ids(tok, chat_template(tok) if template == "base" else None)


def render_prompt(record: dict, template: str = "alpaca") -> str:
  """The prompt text of a record under a hand-written template."""
  if template not in HAND_WRITTEN:
    raise UserError(f"config.data.template={template!r} is not a hand-written template. Fix: "
                    f"one of {HAND_WRITTEN} (or base, rendered by data/chat.py).")
  record = to_alpaca(record)
  if template == "plain":
    return PLAIN.format(instruction=record["instruction"], input=record.get("input", ""))
  if template == "chatml":
    return CHATML.format(instruction=record["instruction"], input=record.get("input", ""))
  text = PROMPT if record.get("input") else PROMPT_NO_INPUT
  return text.format(instruction=record["instruction"], input=record.get("input", ""))


def fit_prompt(ids: list[int], max_prompt_len: int, bos_id: int) -> list[int]:
  """A prompt cut to max_prompt_len from the left: its BOS (if it starts with one) and its
  last tokens, so the question's end and the answer cue survive."""
  if len(ids) <= max_prompt_len:
    return ids
  head = ids[:1] if ids and ids[0] == bos_id and bos_id >= 0 else []
  return head + ids[len(ids) - (max_prompt_len - len(head)):]


def encode_record(record: dict, tokenizer, max_prompt_len: int, max_len: int,
                  template: str = "alpaca"):
  """(prompt ids, output ids + EOS) under a hand-written template, the prompt cut to
  max_prompt_len (`fit_prompt`), the total to max_len."""
  prompt = tokenizer.encode(render_prompt(record, template))
  if getattr(tokenizer, "add_bos", tokenizer.bos_id >= 0):
    prompt = [tokenizer.bos_id] + prompt
  prompt = fit_prompt(prompt, max_prompt_len, tokenizer.bos_id)
  output = tokenizer.encode(to_alpaca(record)["output"]) + [tokenizer.eos_id]
  return prompt, output[:max(0, max_len - len(prompt))]


def encode_example(record: dict, tokenizer, max_prompt_len: int, max_len: int,
                   template: str = "alpaca") -> tuple[list[int], list[int]]:
  """(token ids, 0/1 loss mask) of a training record: the text before the first answer token
  cut to max_prompt_len (`fit_prompt`), the whole to max_len."""
  if template != "base":
    prompt, output = encode_record(record, tokenizer, max_prompt_len, max_len, template)
    return prompt + output, [0] * len(prompt) + [1] * len(output)
  ids, mask = chat.encode_chat(to_messages(record), tokenizer, chat_template(tokenizer))
  first = mask.index(1) if 1 in mask else len(mask)
  if first > max_prompt_len:
    prompt = fit_prompt(ids[:first], max_prompt_len, tokenizer.bos_id)
    ids, mask = prompt + ids[first:], [0] * len(prompt) + mask[first:]
  return ids[:max_len], mask[:max_len]


def prompt_ids(record: dict, tokenizer, max_prompt_len: int, template: str = "alpaca"
               ) -> list[int]:
  """The ids a generation continues: the record's prompt (a chat: every turn before the last
  answer and the assistant's header), cut to max_prompt_len."""
  if template != "base":
    return encode_record(record, tokenizer, max_prompt_len, max_prompt_len, template)[0]
  return fit_prompt(chat.encode_prompt(prompt_messages(record), tokenizer,
                                      chat_template(tokenizer)), max_prompt_len,
                    tokenizer.bos_id)


def left_padded_example(ids: list[int], mask: list[int], seq_len: int,
                        pad_id: int) -> dict[str, np.ndarray]:
  """One row [seq_len]: next-token inputs/targets left-padded, weight mask[t] on target t."""
  seq, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  n = len(seq) - 1                        # number of (input, target) pairs
  pad = seq_len - n
  ex = {k: np.zeros((seq_len,), np.int32) for k in KEYS[:4]}
  ex["inputs"][:] = pad_id
  ex["targets"][:] = pad_id
  ex["inputs"][pad:] = seq[:-1]
  ex["targets"][pad:] = seq[1:]
  ex["positions"][pad:] = np.arange(n)
  ex["segment_ids"][pad:] = 1
  weights = np.zeros((seq_len,), np.float32)
  weights[pad:] = mask[1:]                # targets that are answer tokens
  ex["weights"] = weights
  return ex


def _open(path: str):
  return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def load_records(path: str, field: str = "config.data.train_file") -> list[dict]:
  """Records from a JSON list or JSONL(.gz) file, each a chat, Alpaca or prompt/completion
  record (`record_form`); one error line naming the file and line of the first bad one."""
  if not path or not os.path.exists(path):
    raise UserError(f"{field}={path!r} does not exist. Fix: point it at a JSON or JSONL file "
                    f"of records ({_FORMS}), or use a built-in task "
                    "(config.data.task='arithmetic').")
  try:
    with _open(path) as f:
      text = f.read()
  except (OSError, EOFError, UnicodeDecodeError) as err:
    raise UserError(f"{field}={path!r} cannot be read ({err}). Fix: a UTF-8 JSON or JSONL "
                    "file (optionally .gz).") from err
  if text.lstrip().startswith("["):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as err:
      raise UserError(f"{field}={path!r} is not valid JSON (line {err.lineno}: {err.msg}). "
                      "Fix: one record per line, or a JSON list of records.") from err
    where = [f"record {i} (of the JSON list)" for i in range(len(records))]
  else:
    records, where = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as err:
        raise UserError(f"{field}={path!r} line {lineno} is not valid JSON ({err.msg}). Fix: "
                        "one JSON record per line, or a JSON list of records.") from err
      where.append(f"line {lineno}")
  if not records:
    raise UserError(f"{field}={path!r} has no records. Fix: records of the form {_FORMS}.")
  for record, at in zip(records, where):
    if record_form(record) is None:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise UserError(f"{field}={path!r} {at}: a record of no known form (keys {keys}). Fix: "
                      f"each record is {_FORMS}; a chat needs string role/content and an "
                      "assistant turn.")
  return records


_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim")
_ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles")


def arithmetic_records(count: int, seed: int, max_value: int = 20) -> list[dict]:
  """Generated word problems with a numeric answer: the built-in fine-tuning task."""
  rng = random.Random(seed)
  out = []
  for _ in range(count):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, max_value), rng.randint(1, max_value)
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
      question, answer = f"{name} has {a} {item} and gets {b} more.", a + b
    elif op == "minus":
      a, b = max(a, b), min(a, b)
      question, answer = f"{name} has {a} {item} and gives away {b}.", a - b
    else:
      a, b = a % 10 + 1, b % 10 + 1
      question, answer = f"{name} has {a} bags with {b} {item} in each bag.", a * b
    out.append({"instruction": "Answer with a number.",
                "input": f"{question} How many {item} does {name} have now?",
                "output": str(answer)})
  return out


_SHOPS = ("market", "fair", "shop", "library", "park")


def _gsm_problem(rng: random.Random) -> tuple[str, list[str], int]:
  """One multi-step word problem: (question, worked steps 'a op b = c.', final answer).

  Every intermediate value stays a non-negative integer below 1000.
  """
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  start = rng.randint(5, 40)
  sentences, steps, value = [f"{name} has {start} {item}."], [], start
  for _ in range(rng.randint(2, 3)):
    op = rng.choice(("buy", "give", "bags", "double", "share"))
    if op == "buy":
      n = rng.randint(2, 30)
      sentences.append(f"At the {rng.choice(_SHOPS)} {name} gets {n} more.")
      steps.append(f"{value} + {n} = {value + n}.")
      value += n
    elif op == "give" and value > 2:
      n = rng.randint(1, value - 1)
      sentences.append(f"Then {name} gives {n} to a friend.")
      steps.append(f"{value} - {n} = {value - n}.")
      value -= n
    elif op == "bags" or op == "give":
      a, b = rng.randint(2, 6), rng.randint(2, 9)
      sentences.append(f"{name} also finds {a} boxes with {b} {item} in each box.")
      steps.append(f"{a} * {b} = {a * b}. {value} + {a * b} = {value + a * b}.")
      value += a * b
    elif op == "double" and value < 400:
      sentences.append(f"Then the number of {item} doubles.")
      steps.append(f"{value} * 2 = {value * 2}.")
      value *= 2
    else:
      k = next((k for k in (2, 3, 4, 5) if value % k == 0), None)
      if k is None:   # not divisible: give one away first so it is
        sentences.append(f"Then {name} loses 1.")
        steps.append(f"{value} - 1 = {value - 1}.")
        value -= 1
        k = next((k for k in (2, 3, 4, 5) if value % k == 0), 1)
      if k > 1:
        sentences.append(f"{name} keeps one of {k} equal parts.")
        steps.append(f"{value} / {k} = {value // k}.")
        value //= k
  return " ".join(sentences) + f" How many {item} does {name} have now?", steps, value


def gsm_records(count: int, seed: int) -> list[dict]:
  """GSM8K-style multi-step arithmetic word problems, deterministic in `seed`; the output is
  the worked steps then 'The answer is N.' (scored on N)."""
  rng = random.Random(seed)
  out = []
  for _ in range(count):
    question, steps, answer = _gsm_problem(rng)
    out.append({"instruction": "Solve the problem step by step.", "input": question,
                "output": " ".join(steps) + f" The answer is {answer}."})
  return out


def final_number(text: str) -> str | None:
  """The last number in `text` ('The answer is 42.' -> '42'), or None."""
  found = re.findall(r"-?\d+(?:\.\d+)?", text)
  return found[-1] if found else None


def held_out(make, count: int, seed: int, seen: set[str]) -> list[dict]:
  """The first `count` problems of make(n, seed) whose input is not in `seen`.

  The generators are sequential (make(n) is a prefix of make(n + m)), so the set only grows
  at its end as n grows: a smaller count gives a prefix of it.
  """
  n = count
  while True:
    made = make(n, seed=seed)
    records = [r for r in made if r["input"] not in seen]
    if len(records) >= count:
      return records[:count]
    if n >= 64 * count + 1024:   # the generator's problems are (nearly) all seen
      raise UserError(f"config.data.eval_size={count}: only {len(records)} of {len(made)} "
                      "generated held-out problems differ from the training problems. Fix: a "
                      "smaller config.data.eval_size or config.data.train_size.")
    n = max(n + 1, n + 2 * (count - len(records)))


def task_records(data_cfg, split: str) -> list[dict]:
  """The configured train or eval records (built-in task or files)."""
  if data_cfg.task in ("arithmetic", "gsm"):
    count = data_cfg.train_size if split == "train" else data_cfg.eval_size
    make = arithmetic_records if data_cfg.task == "arithmetic" else gsm_records
    # The held-out split uses its own seed; exact duplicates of training problems are
    # dropped and replaced by further generated problems (held_out).
    if split == "train":
      return make(count, seed=data_cfg.seed)
    seen = {r["input"] for r in make(data_cfg.train_size, seed=data_cfg.seed)}
    return held_out(make, count, data_cfg.seed + 1, seen)
  if data_cfg.eval_file:
    field, path = ("train_file", data_cfg.train_file) if split == "train" else (
        "eval_file", data_cfg.eval_file)
    return load_records(path, f"config.data.{field}")
  # No eval file: the last eval_size records are held out of training and evaluated.
  records = load_records(data_cfg.train_file, "config.data.train_file")
  held = data_cfg.eval_size
  if not 0 < held < len(records):
    raise UserError(f"config.data.eval_size={held}: train_file holds {len(records)} records, "
                    "and with no eval_file the last eval_size of them are held out for "
                    "evaluation. Fix: an eval_size between 1 and "
                    f"{len(records) - 1}, or set config.data.eval_file")
  return records[:-held] if split == "train" else records[-held:]


def split_record(data_cfg) -> dict:
  """What a fine-tune trains and evaluates on, as the run records it (data_split.json): the
  built-in tasks' generated problems, or the files' records (with no eval_file, the last
  eval_size records of train_file, held out of training)."""
  if data_cfg.task in ("arithmetic", "gsm"):
    return {"task": data_cfg.task,
            "train": f"{data_cfg.train_size} problems generated with seed {data_cfg.seed}",
            "eval": f"{data_cfg.eval_size} problems generated with seed {data_cfg.seed + 1}, "
                    "none equal to a training problem"}
  if data_cfg.eval_file:
    return {"task": "files", "train": f"every record of {data_cfg.train_file}",
            "eval": f"every record of {data_cfg.eval_file}"}
  n = len(task_records(data_cfg, "train")) + data_cfg.eval_size
  return {"task": "files", "train": f"records 0..{n - data_cfg.eval_size - 1} of "
                                    f"{data_cfg.train_file}",
          "eval": f"records {n - data_cfg.eval_size}..{n - 1} of {data_cfg.train_file}, held "
                  "out of training"}


def long_prompts(records: list[dict], tokenizer, data_cfg, template: str) -> list[int]:
  """Indices of the records whose prompt exceeds data.max_prompt_len (before `fit_prompt`)."""
  limit = 1 << 30
  return [i for i, r in enumerate(records)
          if len(prompt_ids(r, tokenizer, limit, template)) > data_cfg.max_prompt_len]


def check_prompt_lengths(records: list[dict], tokenizer, data_cfg, template: str,
                         split: str, log=print) -> None:
  """Refuse (data.truncate='refuse') or count in the log (the default 'left') the prompts
  longer than data.max_prompt_len."""
  long = long_prompts(records, tokenizer, data_cfg, template)
  if not long:
    return
  if data_cfg.get("truncate", "left") == "refuse":
    raise UserError(f"config.data.max_prompt_len={data_cfg.max_prompt_len}: {len(long)} of "
                    f"{len(records)} {split} prompts are longer (the first: record {long[0]}). "
                    "Fix: raise max_prompt_len (and seq_len), shorten those records, or set "
                    "config.data.truncate=left to keep their last tokens")
  log(f"data: {len(long)} of {len(records)} {split} prompts exceed max_prompt_len="
      f"{data_cfg.max_prompt_len} tokens; their first tokens are cut (data.truncate=left "
      "keeps BOS and the end: the question's end and the answer cue)")


class _Encode(grain.transforms.Map):
  def __init__(self, tokenizer, data_cfg):
    self.tokenizer, self.cfg = tokenizer, data_cfg
    self.template = resolve_template(data_cfg.template, tokenizer)

  def map(self, record):
    ids, mask = encode_example(record, self.tokenizer, self.cfg.max_prompt_len,
                               self.cfg.seq_len + 1, self.template)
    return left_padded_example(ids, mask, self.cfg.seq_len, self.tokenizer.pad_id)


def make_train_iterator(data_cfg, tokenizer, batch_size: int, *, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """Endless shuffled batches of left-padded rows; a checkpointable grain iterator.

  Every process builds the same global batches (batch_size * process_count rows) and keeps
  its own rows, so the batches do not depend on the process count.
  """
  records = task_records(data_cfg, "train")
  global_batch = batch_size * process_count
  if len(records) < global_batch:
    raise UserError(f"config.data: {len(records)} training records for batch size "
                    f"{global_batch}. Fix: more records or a smaller config.train.batch_size.")
  encode = _Encode(tokenizer, data_cfg)
  # Refused now, not when the first batch is drawn: records a hand-written template cannot
  # render, a chat template that refuses the data, prompts too long under truncate=refuse.
  if encode.template in HAND_WRITTEN:
    for record in records:
      to_alpaca(record)
  else:
    encode.map(records[0])
  check_prompt_lengths(records, tokenizer, data_cfg, encode.template, "training",
                       log=print if process_index == 0 else (lambda _: None))
  ds = (grain.MapDataset.source(records).shuffle(seed=seed).repeat()
        .map(encode).batch(global_batch, drop_remainder=True)
        .map(ProcessRows(process_index, process_count)))
  return iter(ds.to_iter_dataset())


def make_eval_batches(data_cfg, tokenizer, batch_size: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """Every eval record as left-padded loss batches (the last one padded with weight 0):
  global batches of batch_size * process_count rows, of which this process keeps its own."""
  enc = _Encode(tokenizer, data_cfg)
  records = task_records(data_cfg, "eval")
  check_prompt_lengths(records, tokenizer, data_cfg, enc.template, "eval",
                       log=print if process_index == 0 else (lambda _: None))
  rows = [enc.map(r) for r in records]
  blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
  global_batch = batch_size * process_count
  rows += [blank] * (-len(rows) % global_batch)
  rows_of = ProcessRows(process_index, process_count)
  return [rows_of(stack_rows(rows[i:i + global_batch]))
          for i in range(0, len(rows), global_batch)]


def left_pad(prompts: list[list[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ids [B, length] and mask (1 on real tokens) of prompts no longer than length."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, prompt in enumerate(prompts):
    ids[i, length - len(prompt):] = prompt
    mask[i, length - len(prompt):] = 1
  return ids, mask


def prompt_batch(records: list[dict], tokenizer, prompt_len: int, template: str = "alpaca"):
  """Left-padded prompt ids [B, prompt_len] and mask, for decoding."""
  return left_pad([prompt_ids(r, tokenizer, prompt_len, template) for r in records],
                  prompt_len, tokenizer.pad_id)


def cut_at_stop(ids, stop: tuple[int, ...]) -> list[int]:
  """The ids before the first stop id."""
  ids = [int(i) for i in ids]
  at = next((k for k, i in enumerate(ids) if i in stop), len(ids))
  return ids[:at]


def exact_match(generated_ids: np.ndarray, records: list[dict], tokenizer,
                final_answer: bool = False, stop: tuple[int, ...] | None = None) -> float:
  """Fraction of records whose decoded answer (up to the first stop id, default EOS) equals
  the reference answer; with final_answer, whose last number equals the reference's last
  number (worked solutions)."""
  stop = (tokenizer.eos_id,) if stop is None else stop
  hits = 0
  for row, record in zip(generated_ids, records):
    text = tokenizer.decode(cut_at_stop(row, stop)).strip()
    want = reference(record)
    if final_answer:
      hits += final_number(text) is not None and final_number(text) == final_number(want)
    else:
      hits += text == want.strip()
  return hits / max(1, len(records))
