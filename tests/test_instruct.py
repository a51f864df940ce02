"""Instruction data: left-padded layout, prompt masking, records, exact match."""

import gzip
import json

import numpy as np
import pytest

from lost_jax import configs
from lost_jax.data import instruct
from lost_jax.errors import UserError


class FakeTokenizer:
  """Characters -> ids 10.. (printable ASCII and newline); pad 0, eos 1, bos 3 (special:
  decoded as nothing)."""
  pad_id, eos_id, bos_id = 0, 1, 3
  chat_template, path, name = "", "", "fake"

  def encode(self, text):
    return [10 + ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(i - 10) for i in ids if i >= 10)

  def id_to_token(self, i):
    return {0: "<pad>", 1: "</s>", 3: "<s>"}.get(i) or chr(i - 10)


# A chat template whose assistant turns end with '|' (one character: one token here).
TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ '|' }}{% endif %}{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


def chat_tokenizer():
  tok = FakeTokenizer()
  tok.chat_template = TEMPLATE
  return tok


def test_left_padded_example_layout_by_hand():
  ex = instruct.left_padded_example([3, 11, 12, 20, 21, 1], [0, 0, 0, 1, 1, 1], seq_len=8,
                                   pad_id=0)
  # sequence 3 11 12 20 21 1 -> 5 (input, target) pairs, 3 pads on the left
  np.testing.assert_array_equal(ex["inputs"], [0, 0, 0, 3, 11, 12, 20, 21])
  np.testing.assert_array_equal(ex["targets"], [0, 0, 0, 11, 12, 20, 21, 1])
  np.testing.assert_array_equal(ex["positions"], [0, 0, 0, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(ex["segment_ids"], [0, 0, 0, 1, 1, 1, 1, 1])
  # loss only where the target is an output token: 20, 21, EOS
  np.testing.assert_array_equal(ex["weights"], [0, 0, 0, 0, 0, 1, 1, 1])


def test_truncation_keeps_bos_and_the_prompt_end_and_caps_the_length():
  tok = FakeTokenizer()
  record = {"instruction": "x" * 30 + "END?", "input": "", "output": "123456789"}
  prompt, output = instruct.encode_record(record, tok, max_prompt_len=10, max_len=14)
  assert len(prompt) == 10 and prompt[0] == tok.bos_id
  assert prompt[1:] == tok.encode(instruct.render_prompt(record))[-9:]   # the answer cue
  assert len(prompt) + len(output) == 14 and output == tok.encode("1234")
  assert instruct.fit_prompt([3, 20, 21, 22, 23, 24], 4, bos_id=3) == [3, 22, 23, 24]
  assert instruct.fit_prompt([20, 21, 22, 23, 24], 3, bos_id=3) == [22, 23, 24]
  assert instruct.fit_prompt([3, 20], 4, bos_id=3) == [3, 20]


def test_chat_truncation_keeps_the_assistant_header_and_the_whole_answer():
  tok = chat_tokenizer()
  record = {"messages": [{"role": "user", "content": "q" * 40 + "LAST"},
                         {"role": "assistant", "content": "42"}]}
  ids, mask = instruct.encode_example(record, tok, max_prompt_len=20, max_len=100,
                                      template="base")
  prompt = [i for i, m in zip(ids, mask) if not m]
  answer = [i for i, m in zip(ids, mask) if m]
  assert len(prompt) == 20 and tok.decode(prompt) == "qqqqLAST\n<assistant>"
  assert tok.decode(answer) == "42|"
  assert instruct.prompt_ids(record, tok, 20, "base") == prompt


def test_long_prompts_are_counted_or_refused():
  tok = FakeTokenizer()
  records = [{"instruction": "x" * n, "input": "", "output": "1"} for n in (2, 50, 3, 60)]
  cfg = configs.finetune_config("quickstart").data
  cfg.max_prompt_len = 40
  assert instruct.long_prompts(records, tok, cfg, "plain") == [1, 3]
  lines = []
  instruct.check_prompt_lengths(records, tok, cfg, "plain", "training", log=lines.append)
  assert len(lines) == 1 and lines[0].startswith("data: 2 of 4 training prompts exceed "
                                                 "max_prompt_len=40 tokens")
  cfg.truncate = "refuse"
  with pytest.raises(UserError, match=r"2 of 4 training prompts are longer \(the first: "
                     r"record 1\)"):
    instruct.check_prompt_lengths(records, tok, cfg, "plain", "training")


def test_without_an_eval_file_the_eval_records_are_held_out_of_training(tmp_path):
  records = [{"instruction": f"q{i}", "input": "", "output": str(i)} for i in range(10)]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(records))
  cfg = configs.finetune_config("quickstart").data
  cfg.update(dict(task="files", train_file=str(path), eval_file="", eval_size=3))
  train, held = instruct.task_records(cfg, "train"), instruct.task_records(cfg, "eval")
  assert train == records[:7] and held == records[7:]
  cfg.eval_size = 10
  with pytest.raises(UserError, match="eval_size=10: train_file holds 10 records"):
    instruct.task_records(cfg, "train")


def test_templates():
  rec = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
  alpaca = instruct.render_prompt(rec)
  assert "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n" in alpaca
  no_input = instruct.render_prompt({"instruction": "Add.", "output": "5"})
  assert "### Input" not in no_input and no_input.endswith("### Response:\n")
  assert instruct.render_prompt(rec, "plain") == "Add.\n2 and 3\nAnswer: "
  with pytest.raises(ValueError, match="template"):
    instruct.render_prompt(rec, "vicuna")


def test_arithmetic_records_are_correct_and_deterministic():
  recs = instruct.arithmetic_records(300, seed=5)
  assert recs == instruct.arithmetic_records(300, seed=5)
  assert recs != instruct.arithmetic_records(300, seed=6)
  import re
  for r in recs:
    nums = [int(n) for n in re.findall(r"\d+", r["input"])]
    a, b = nums[0], nums[1]
    assert int(r["output"]) in (a + b, a - b, a * b)
    if "more" in r["input"]:
      assert int(r["output"]) == a + b
    elif "gives away" in r["input"]:
      assert int(r["output"]) == a - b >= 0
    else:
      assert int(r["output"]) == a * b


def test_load_records_json_jsonl_gz_and_errors(tmp_path):
  recs = [{"instruction": "i", "input": "", "output": "o"}] * 3
  (tmp_path / "a.json").write_text(json.dumps(recs))
  with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
    f.write("\n".join(json.dumps(r) for r in recs))
  assert instruct.load_records(str(tmp_path / "a.json")) == recs
  assert instruct.load_records(str(tmp_path / "a.jsonl.gz")) == recs
  with pytest.raises(ValueError, match="does not exist"):
    instruct.load_records(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text('[{"instruction": "i"}]')
  with pytest.raises(ValueError, match="record 0 .*no known form"):
    instruct.load_records(str(tmp_path / "bad.json"))
  (tmp_path / "broken.jsonl").write_text('{"instruction": ')
  with pytest.raises(ValueError, match="line 1 is not valid JSON"):
    instruct.load_records(str(tmp_path / "broken.jsonl"))
  (tmp_path / "empty.json").write_text("[]")
  with pytest.raises(ValueError, match="no records"):
    instruct.load_records(str(tmp_path / "empty.json"))


def test_prompt_batch_and_exact_match():
  tok = FakeTokenizer()
  recs = [{"instruction": "a", "input": "", "output": "12"},
          {"instruction": "bb", "input": "", "output": "7"}]
  ids, mask = instruct.prompt_batch(recs, tok, prompt_len=64, template="plain")
  for r, row, m in zip(recs, ids, mask):
    want = [tok.bos_id] + tok.encode(instruct.render_prompt(r, "plain"))
    assert row[m.astype(bool)].tolist() == want and m[-1] == 1 and m[0] == 0
  gen = np.array([tok.encode("12") + [tok.eos_id, 99], tok.encode("8") + [tok.eos_id] * 3])
  assert instruct.exact_match(gen, recs, tok) == 0.5


def test_gsm_records_are_correct_deterministic_and_held_out():
  import re
  recs = instruct.gsm_records(600, seed=0)
  assert recs == instruct.gsm_records(600, seed=0) and recs != instruct.gsm_records(600, seed=1)
  ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
         "/": lambda a, b: a / b}
  n_steps = []
  for r in recs:
    steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", r["output"])
    n_steps.append(len(steps))
    for a, op, b, c in steps:     # every worked step is true arithmetic
      assert ops[op](int(a), int(b)) == int(c), r["output"]
    start = int(re.match(r"\w+ has (\d+)", r["input"]).group(1))
    assert int(steps[0][0]) in (start, 2, 3, 4, 5, 6)   # starts from the given count or a box
    answer = int(instruct.final_number(r["output"]))
    assert r["output"].endswith(f"The answer is {answer}.") and answer == int(steps[-1][3])
  assert min(n_steps) >= 2 and max(n_steps) >= 4        # multi-step
  cfg = configs.finetune_config("smollm2_135m_gsm").data
  test = instruct.task_records(cfg, "eval")
  train = {r["input"] for r in instruct.task_records(cfg, "train")}
  assert len(test) == cfg.eval_size == 500 and not any(r["input"] in train for r in test)
  # Duplicates of training problems are replaced by later problems: the set made before
  # (the first 500 generated, less those duplicates: 499) is its prefix.
  before = [r for r in instruct.gsm_records(500, seed=cfg.seed + 1) if r["input"] not in train]
  assert len(before) == 499 and test[:499] == before


def test_held_out_tops_up_after_dropping_seen_problems():
  def make(n, seed):   # sequential like the task generators: make(n) is a prefix of make(n+1)
    return [{"input": f"p{(seed * 7 + i) % 13}"} for i in range(n)]
  seen = {"p3", "p4", "p9"}
  got = instruct.held_out(make, 6, 0, seen)
  assert [r["input"] for r in got] == ["p0", "p1", "p2", "p5", "p6", "p7"]
  assert instruct.held_out(make, 3, 0, seen) == got[:3]
  # 13 distinct problems, 3 seen: 10 can be held out (repeats are not deduplicated, so a
  # cycling generator can always fill; a generator that runs dry cannot).
  dry = lambda n, seed: make(min(n, 13), seed)
  assert len(instruct.held_out(dry, 10, 0, seen)) == 10
  with pytest.raises(UserError, match="eval_size=11: only 10 of"):
    instruct.held_out(dry, 11, 0, seen)


def test_chatml_template_and_final_answer_match():
  rec = {"instruction": "Solve.", "input": "Ada has 2 pens.", "output": "The answer is 2."}
  text = instruct.render_prompt(rec, "chatml")
  assert text.startswith("<|im_start|>system\n") and text.endswith(
      "<|im_start|>user\nSolve.\nAda has 2 pens.<|im_end|>\n<|im_start|>assistant\n")
  assert instruct.final_number("3 + 4 = 7. The answer is 7.") == "7"
  assert instruct.final_number("no digits") is None
  tok = FakeTokenizer()
  recs = [{"instruction": "i", "output": "1 + 1 = 2. The answer is 2."},
          {"prompt": "p", "completion": "The answer is 5."}]
  gen = np.array([[10 + ord(c) for c in "so it is 2".ljust(16)] + [1],
                  [10 + ord(c) for c in "The answer is 50"] + [1]])
  assert instruct.exact_match(gen, recs, tok, final_answer=True) == 0.5
  assert instruct.exact_match(gen, recs, tok) == 0.0


def test_chat_records_loss_on_every_assistant_turn_by_hand():
  tok = chat_tokenizer()
  rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]}
  ids, mask = instruct.encode_example(rec, tok, max_prompt_len=64, max_len=128, template="base")
  # the text up to the last answer's end of turn, by hand: answers 'Yo|' and 'A|' carry loss
  parts = [("<system>S\n<user>Hi\n<assistant>", 0), ("Yo|", 1), ("\n<user>Q\n<assistant>", 0),
           ("A|", 1)]
  assert ids == tok.encode("".join(p for p, _ in parts))
  assert mask == [w for p, w in parts for _ in p]
  ex = instruct.left_padded_example(ids, mask, seq_len=64, pad_id=0)
  pad = 64 - (len(ids) - 1)
  # target t is ids[t + 1]: weight 1 exactly on targets 'Y', 'o', '|', 'A', '|'
  targets = [chr(t - 10) for t, w in zip(ex["targets"][pad:], ex["weights"][pad:]) if w]
  assert targets == list("Yo|A|") and ex["weights"][:pad].sum() == 0
  # the generation prompt: every turn before the last answer, then the assistant's header
  assert instruct.prompt_ids(rec, tok, 64, "base") == tok.encode(
      "<system>S\n<user>Hi\n<assistant>Yo|\n<user>Q\n<assistant>")
  assert instruct.reference(rec) == "A"
  assert instruct.stop_ids(tok, "base") == (tok.eos_id, tok.encode("|")[0])


def test_alpaca_and_completion_records_under_a_chat_template_by_hand():
  tok = chat_tokenizer()
  for rec, user, answer in (
      ({"instruction": "Add.", "input": "2 3", "output": "5"}, "Add.\n2 3", "5"),
      ({"instruction": "Hi.", "output": "Yo"}, "Hi.", "Yo"),
      ({"prompt": "P?", "completion": "C."}, "P?", "C.")):
    ids, mask = instruct.encode_example(rec, tok, 64, 128, "base")
    head = f"<user>{user}\n<assistant>"
    assert ids == tok.encode(head + answer + "|")
    assert mask == [0] * len(head) + [1] * (len(answer) + 1)
  # A prompt longer than max_prompt_len keeps its end; the total is cut to max_len.
  ids, mask = instruct.encode_example({"prompt": "x" * 20, "completion": "abc"}, tok, 10, 12,
                                      "base")
  assert ids == tok.encode("assistant>") + tok.encode("ab") and mask == [0] * 10 + [1, 1]


def test_hand_written_templates_take_every_form():
  tok = FakeTokenizer()
  want = instruct.encode_example({"instruction": "P?", "output": "C."}, tok, 64, 128, "plain")
  for rec in ({"prompt": "P?", "completion": "C."},
              {"messages": [{"role": "user", "content": "P?"},
                            {"role": "assistant", "content": "C."}]}):
    assert instruct.encode_example(rec, tok, 64, 128, "plain") == want
  ids, mask = want
  assert ids == [tok.bos_id] + tok.encode("P?\n\nAnswer: C.") + [tok.eos_id]
  assert mask == [0] * (1 + len("P?\n\nAnswer: ")) + [1, 1, 1]
  multi = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "P"},
                        {"role": "assistant", "content": "C"}]}
  with pytest.raises(UserError, match="template=base"):
    instruct.encode_example(multi, tok, 64, 128, "alpaca")


def test_resolve_template():
  tok = FakeTokenizer()
  assert instruct.resolve_template("auto", tok) == "alpaca"
  assert instruct.resolve_template("auto", chat_tokenizer()) == "base"
  assert instruct.resolve_template("plain", chat_tokenizer()) == "plain"
  with pytest.raises(UserError, match="template=base but the tokenizer 'fake' has no chat"):
    instruct.resolve_template("base", tok)
  with pytest.raises(UserError, match="unknown"):
    instruct.resolve_template("vicuna", tok)
  cfg = configs.finetune_config("quickstart")
  cfg.data.template = "vicuna"    # refused with the config, before anything is loaded
  with pytest.raises(UserError, match=r"config.data.template: 'vicuna' is unknown"):
    configs.validate(cfg, "finetune")


def test_load_records_of_every_form_and_a_bad_line(tmp_path):
  recs = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
          {"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"}]
  path = tmp_path / "mixed.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
  assert instruct.load_records(str(path)) == recs
  bad = recs + [{"messages": [{"role": "user", "content": "no answer"}]}]
  path.write_text("\n".join(json.dumps(r) for r in bad[:2]) + "\n\n" +
                  "\n".join(json.dumps(r) for r in bad[2:]))
  with pytest.raises(UserError, match=r"mixed.jsonl' line 5: a record of no known form"):
    instruct.load_records(str(path))
  (tmp_path / "list.json").write_text(json.dumps([recs[0], {"question": "q"}]))
  with pytest.raises(UserError, match=r"list.json' record 1 .*keys \['question'\]"):
    instruct.load_records(str(tmp_path / "list.json"))
