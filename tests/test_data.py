"""Data pipeline and tokenizer: layouts against hand-computed rows, sources, errors, resume."""

import gzip
import json
import os

import grain
import numpy as np
import pytest

from lost_jax import configs
from lost_jax.data import batch as batch_lib
from lost_jax.data import sources
from lost_jax.data import text as data
from lost_jax.data import tokenizer as tokenizer_lib

VOCAB = 512


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    path = str(tmp_path_factory.mktemp("cache"))
    mp.setenv("LOST_JAX_CACHE", path)
    yield path


@pytest.fixture(scope="module")
def tok(cache):
  return tokenizer_lib.load_tokenizer(configs.data_config(), VOCAB)


def _cfg(**kw):
  cfg = configs.data_config(seq_len=32)
  cfg.shuffle_window = 64    # small windows keep the tests fast on tiny documents.
  cfg.update(kw)
  return cfg


def _doc_text(i: int) -> str:
  return f"record {i:04d} says the quick brown fox jumps over {i % 7} lazy dogs."


def _write_jsonl_gz(path, first: int, count: int):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i in range(first, first + count):
      f.write(json.dumps({"text": _doc_text(i), "url": f"u{i}"}) + "\n")
    f.write("\n")                          # blank lines and text-less records are skipped.
    f.write(json.dumps({"url": "no text"}) + "\n")


def _same(a, b) -> bool:
  return all(np.array_equal(a[k], b[k]) for k in batch_lib.KEYS)


def _segment_texts(tok, batch) -> list[str]:
  """Decoded inputs of every segment of every row."""
  out = []
  for inputs_L, seg_L in zip(batch["inputs"], batch["segment_ids"]):
    for s in np.unique(seg_L[seg_L > 0]):
      out.append(tok.decode(inputs_L[seg_L == s]).strip())
  return out


def _record_numbers(texts) -> set[int]:
  return {int(t.split("record ")[1][:4]) for t in texts if "record " in t and
          len(t.split("record ")[1]) >= 4}


# ---------------------------------------------------------------------------------- layouts


def _reference_pack(docs, seq_len):
  """Independent concat-then-split: one flat stream of (input, target, doc, offset) cut into
  rows; a fragment restarts its positions and takes the next segment id of its row."""
  stream = []
  for d, ids in enumerate(docs):
    stream += [(ids[t], ids[t + 1], d) for t in range(len(ids) - 1)]
  rows = []
  for start in range(0, len(stream), seq_len):
    chunk = stream[start:start + seq_len]
    row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "positions",
                                                      "segment_ids")}
    row["weights"] = np.zeros(seq_len, np.float32)
    seg, pos, prev = 0, 0, None
    for i, (x, y, d) in enumerate(chunk):
      if d != prev:
        seg, pos, prev = seg + 1, 0, d
      row["inputs"][i], row["targets"][i] = x, y
      row["positions"][i], row["segment_ids"][i], row["weights"][i] = pos, seg, 1.0
      pos += 1
    rows.append(row)
  return rows


def test_pack_matches_concat_then_split_reference():
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, 100, size=n).astype(np.int32) for n in (3, 9, 2, 14, 5, 7, 2)]
  ds = grain.MapDataset.source(docs).map(data.shift_document).to_iter_dataset()
  got = list(data.pack(ds, seq_len=8, pad_id=0))
  want = _reference_pack(docs, 8)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert _same(g, w), (g, w)


def test_pack_state_survives_json_at_a_document_boundary():
  docs = [np.arange(1, n + 1, dtype=np.int32) * 10 for n in (5, 9, 4, 7)]
  ds = grain.MapDataset.source(docs).map(data.shift_document).to_iter_dataset()
  it = iter(data.pack(ds, seq_len=4, pad_id=0))     # the first row ends where a document does.
  next(it)
  state = json.loads(json.dumps(it.get_state()))    # no partial document: (-1, -1) slices.
  want = list(it)
  fresh = iter(data.pack(ds, seq_len=4, pad_id=0))
  fresh.set_state(state)
  got = list(fresh)
  assert len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))


def test_packed_batches_honour_document_boundaries(tok):
  cfg = _cfg(seq_len=64)
  it = data.make_train_iterator(cfg, tok, 8, seed=1)
  saw_boundary = False
  for _ in range(4):
    b = next(it)
    assert {k: b[k].dtype for k in batch_lib.KEYS} == {
        "inputs": np.int32, "targets": np.int32, "positions": np.int32,
        "segment_ids": np.int32, "weights": np.float32}
    assert all(b[k].shape == (8, 64) for k in batch_lib.KEYS)
    for r in range(8):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      same = seg[1:] == seg[:-1]
      saw_boundary |= bool((~same & (seg[1:] > 0)).any())
      # Inside a segment positions count up and each target is the next input.
      assert (pos[1:][same & (seg[1:] > 0)] == pos[:-1][same & (seg[1:] > 0)] + 1).all()
      assert (b["targets"][r][:-1][same] == b["inputs"][r][1:][same]).all()
      # Every new segment starts at position 0; a document's last target is EOS.
      starts = np.flatnonzero(np.r_[True, ~same] & (seg > 0))
      assert (pos[starts] == 0).all()
      ends = np.flatnonzero(np.r_[~same, True] & (seg > 0))
      assert (b["targets"][r][ends[:-1]] == tok.eos_id).all()
      np.testing.assert_array_equal(b["weights"][r], (seg > 0).astype(np.float32))
  assert saw_boundary


def test_anchor_layout_hand_computed():
  eos, pad = 1, 0
  got = data.anchor_example(np.array([5, 6, 7], np.int32), 6, pad, eos)
  want = dict(inputs=[5, 6, 7, 1, 0, 0], targets=[6, 7, 1, 0, 0, 0], positions=[0, 1, 2, 3, 0, 0],
              segment_ids=[1, 1, 1, 1, 0, 0], weights=[1, 1, 1, 0, 0, 0])
  for k in batch_lib.KEYS:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Truncation keeps seq_len - 1 tokens and then EOS, as the anchors' HF tokenizer does.
  got = data.anchor_example(np.arange(10, 18, dtype=np.int32), 6, pad, eos)
  np.testing.assert_array_equal(got["inputs"], [10, 11, 12, 13, 14, 1])
  np.testing.assert_array_equal(got["targets"], [11, 12, 13, 14, 1, 0])
  np.testing.assert_array_equal(got["weights"], [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(got["segment_ids"], [1] * 6)
  got = data.anchor_example(np.arange(10, 18, dtype=np.int32), 6, pad, None)
  np.testing.assert_array_equal(got["inputs"], [10, 11, 12, 13, 14, 15])
  np.testing.assert_array_equal(got["weights"], [1, 1, 1, 1, 1, 0])


def test_anchor_layout_end_to_end(tok, tmp_path):
  path = tmp_path / "c4.jsonl.gz"
  _write_jsonl_gz(path, 0, 40)
  cfg = _cfg(source="files", files=str(path), packing=False, seq_len=12)
  b = next(data.make_train_iterator(cfg, tok, 6, seed=0))
  texts = {_doc_text(i) for i in range(40)}
  for r in range(6):
    n = int(b["segment_ids"][r].sum())
    ids = b["inputs"][r][:n]
    assert ids[-1] == tok.eos_id and tok.bos_id not in ids
    matches = [t for t in texts if tok.encode(t)[:11] == list(ids[:-1])]
    assert len(matches) == 1
    want = data.anchor_example(np.array(tok.encode(matches[0]), np.int32), 12, tok.pad_id,
                               tok.eos_id)
    assert _same({k: b[k][r] for k in batch_lib.KEYS}, want)


# ---------------------------------------------------------------------------------- sources


def test_stdlib_split_deterministic_and_disjoint():
  train, evals = sources.stdlib_split(0.1, "train"), sources.stdlib_split(0.1, "eval")
  assert not set(train) & set(evals)
  assert sorted(train + evals) == list(sources.stdlib_document_ids())
  assert train == sources.stdlib_split(0.1, "train")
  assert 0.05 < len(evals) / (len(train) + len(evals)) < 0.15
  assert any(i.startswith("topic:") for i in train) and any(i.startswith("lib:") for i in train)


def test_stdlib_eval_batches_same_every_call(tok):
  cfg = _cfg()
  a = data.make_eval_batches(cfg, tok, 4, 3)
  b = data.make_eval_batches(cfg, tok, 4, 3)
  assert len(a) == 3 and all(_same(x, y) for x, y in zip(a, b))
  # The validation rows come from held-out documents only.
  first = next(x for x in sources.stdlib_split(cfg.eval_fraction, "eval")
               if tok.encode(sources.read_stdlib_document(x)))
  want = tok.encode(sources.read_stdlib_document(first))[:cfg.seq_len]
  np.testing.assert_array_equal(a[0]["inputs"][0][:len(want)], want)


def test_train_shuffle_is_seeded(tok):
  cfg = _cfg()
  a = next(data.make_train_iterator(cfg, tok, 4, seed=0))
  b = next(data.make_train_iterator(cfg, tok, 4, seed=0))
  c = next(data.make_train_iterator(cfg, tok, 4, seed=1))
  assert _same(a, b) and not _same(a, c)


def test_jsonl_gz_source(tok, tmp_path):
  _write_jsonl_gz(tmp_path / "c4-train.00000.json.gz", 0, 60)
  _write_jsonl_gz(tmp_path / "c4-train.00001.json.gz", 60, 60)
  cfg = _cfg(source="files", files=str(tmp_path / "c4-train.*.json.gz"), eval_fraction=0.2)
  it = data.make_train_iterator(cfg, tok, 4, seed=0)
  train_seen = set()
  for _ in range(12):
    b = next(it)
    assert b["weights"].sum() > 0
    texts = _segment_texts(tok, b)
    assert all(any(t in _doc_text(i) for i in range(120)) for t in texts)
    train_seen |= _record_numbers(texts)
  want_eval = [i for i in range(120)
               if sources.in_eval_split(f"c4-train.{i // 60:05d}.json.gz:{i % 60}", 0.2)]
  assert train_seen and not train_seen & set(want_eval)
  # Validation reads the held-out records in file order: its real inputs, concatenated, are
  # exactly their encodings (each document's EOS is only ever a target).
  evals = data.make_eval_batches(cfg, tok, 4, 100)
  got = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in evals])
  want = np.concatenate([tok.encode(_doc_text(i)) for i in want_eval])
  np.testing.assert_array_equal(got, want)


def test_tfds_mock_source(tok):
  tfds = pytest.importorskip("tensorflow_datasets")
  # data_source under mock_data yields random 'text' strings of the real c4 features.
  with tfds.testing.mock_data(num_examples=16):
    cfg = _cfg(source="tfds", tfds_name="c4/en:3.1.0", tfds_data_dir="/nonexistent")
    b = next(data.make_train_iterator(cfg, tok, 4, seed=0))
    evals = data.make_eval_batches(cfg, tok, 4, 2)
  assert b["inputs"].shape == (4, 32) and b["weights"].sum() > 0
  assert (b["inputs"][b["segment_ids"] > 0] != tok.pad_id).all()
  assert len(evals) == 2 and evals[0]["weights"].sum() > 0


def test_tfds_missing_dataset_is_a_clear_error(tok, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(source="tfds", tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"(?s)config\.data\.tfds_name.*Fix"):
    data.make_train_iterator(cfg, tok, 4, seed=0)


# ---------------------------------------------------------------------------------- errors


def _bad_source(tmp_path, kind):
  p = tmp_path / "x.jsonl.gz"
  if kind == "unset":
    return ""
  if kind == "missing":
    return str(tmp_path / "nothing-*.jsonl.gz")
  if kind == "empty":
    p.write_bytes(b"")
  elif kind == "no_text":
    with gzip.open(p, "wt") as f:
      f.write('{"url": "a"}\n{"content": "b"}\n')
  elif kind == "corrupt_gzip":
    p.write_bytes(b"this is not gzip data at all" * 10)
  elif kind == "truncated_gzip":
    with gzip.open(p, "wt") as f:
      f.write("".join(json.dumps({"text": _doc_text(i)}) + "\n" for i in range(20)))
    p.write_bytes(p.read_bytes()[:-30])
  elif kind == "bad_json":
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "fine"}\n{"text": broken\n')
  return str(p)


@pytest.mark.parametrize("kind", ["unset", "missing", "empty", "no_text", "corrupt_gzip",
                                  "truncated_gzip", "bad_json"])
def test_bad_file_source_is_one_clear_error(tok, tmp_path, kind):
  cfg = _cfg(source="files", files=_bad_source(tmp_path, kind))
  with pytest.raises(ValueError, match=r"config\.data\.files.*Fix"):
    data.make_train_iterator(cfg, tok, 4, seed=0)


def test_bad_eval_files_names_eval_files(tok, tmp_path):
  _write_jsonl_gz(tmp_path / "train.jsonl.gz", 0, 10)
  cfg = _cfg(source="files", files=str(tmp_path / "train.jsonl.gz"),
             eval_files=str(tmp_path / "val-*.jsonl.gz"))
  next(data.make_train_iterator(cfg, tok, 2, seed=0))
  with pytest.raises(ValueError, match=r"config\.data\.eval_files.*Fix"):
    data.make_eval_batches(cfg, tok, 2, 1)


def test_empty_split_is_a_clear_error(tok, tmp_path):
  p = tmp_path / "one.txt"
  p.write_text("a single document")
  h = sources.hash_fraction("one.txt:0")
  held_out = _cfg(source="files", files=str(p), eval_fraction=min(h + 1e-6, 0.999999))
  with pytest.raises(ValueError, match=r"config\.data\.files.*no non-empty document.*Fix"):
    data.make_train_iterator(held_out, tok, 2, seed=0)
  kept = _cfg(source="files", files=str(p), eval_fraction=max(h - 1e-6, 1e-9))
  next(data.make_train_iterator(kept, tok, 2, seed=0))
  with pytest.raises(ValueError, match=r"config\.data\.files.*no non-empty document.*Fix"):
    data.make_eval_batches(kept, tok, 2, 1)


# ---------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("source", ["stdlib", "files"])
def test_iterator_state_restore_gives_identical_batches(tok, tmp_path, source):
  for f in range(3):
    _write_jsonl_gz(tmp_path / f"part{f}.jsonl.gz", 50 * f, 50)
  cfg = _cfg(source=source, files=str(tmp_path / "part*.jsonl.gz"))
  it = data.make_train_iterator(cfg, tok, 4, seed=3)
  assert isinstance(it, grain.DatasetIterator)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # as grain's checkpoint handler stores it.
  want = [next(it) for _ in range(4)]
  fresh = data.make_train_iterator(cfg, tok, 4, seed=3)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(4)]
  assert all(_same(g, w) for g, w in zip(got, want))
  assert not _same(want[0], want[1])


# ---------------------------------------------------------------------------------- sharding


def test_stdlib_process_shards_are_disjoint(tok):
  cfg = _cfg(packing=False, seq_len=128, eval_fraction=0.1)
  n_docs = sum(bool(tok.encode(sources.read_stdlib_document(i)))
               for i in sources.stdlib_split(0.1, "eval"))
  rows = []
  for p in range(2):
    batches = data.make_eval_batches(cfg, tok, 8, 100, process_index=p, process_count=2)
    rows.append({tuple(r) for b in batches for r, s in zip(b["inputs"], b["segment_ids"])
                 if s.any()})
  assert not rows[0] & rows[1]
  assert len(rows[0]) + len(rows[1]) == n_docs


def test_stdlib_batches_do_not_depend_on_the_process_count(tok):
  cfg = _cfg()
  one = data.make_train_iterator(cfg, tok, 8, seed=3)
  two = [data.make_train_iterator(cfg, tok, 4, seed=3, process_index=p, process_count=2)
         for p in range(2)]
  for _ in range(3):
    whole, parts = next(one), [next(it) for it in two]
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([parts[0][k], parts[1][k]]))
  evals = [data.make_eval_batches(cfg, tok, 4, 2, process_index=p, process_count=2)
           for p in range(2)]
  for whole, a, b in zip(data.make_eval_batches(cfg, tok, 8, 2), *evals):
    np.testing.assert_array_equal(whole["inputs"], np.concatenate([a["inputs"], b["inputs"]]))


@pytest.mark.parametrize("n_files", [1, 4])
def test_file_process_shards_are_disjoint(tok, tmp_path, n_files):
  per = 80 // n_files
  for f in range(n_files):
    _write_jsonl_gz(tmp_path / f"part{f}.jsonl.gz", per * f, per)
  # Anchors' layout: one whole record per row, so each row names its record.
  cfg = _cfg(source="files", files=str(tmp_path / "part*.jsonl.gz"), eval_fraction=0.0,
             packing=False)
  for p in range(2):
    # Enough files: whole files per process; otherwise every other record of each file.
    want = ({i for i in range(80) if (i // per) % 2 == p} if n_files > 1 else
            {i for i in range(80) if i % 2 == p})
    it = data.make_train_iterator(cfg, tok, 4, seed=0, process_index=p, process_count=2)
    seen = set().union(*(_record_numbers(_segment_texts(tok, next(it))) for _ in range(30)))
    assert seen <= want and len(seen) >= 30


def test_multi_process_eval_has_the_same_number_of_batches(tok, tmp_path):
  _write_jsonl_gz(tmp_path / "val.jsonl.gz", 0, 5)
  _write_jsonl_gz(tmp_path / "train.jsonl.gz", 100, 5)
  cfg = _cfg(source="files", files=str(tmp_path / "train.jsonl.gz"),
             eval_files=str(tmp_path / "val.jsonl.gz"), seq_len=64)
  n_pred = sum(len(tok.encode(_doc_text(i))) for i in range(5))   # EOS is the last target.
  n_rows = -(-n_pred // 64)
  assert n_rows < 8
  single = data.make_eval_batches(cfg, tok, 8, 5)
  assert len(single) == 1 and single[0]["weights"].sum() == n_pred
  assert not single[0]["segment_ids"][n_rows:].any()     # all-padding rows fill the batch.
  multi = [data.make_eval_batches(cfg, tok, 8, 5, process_index=p, process_count=2)
           for p in range(2)]
  assert [len(m) for m in multi] == [5, 5]
  assert sum(float(b["weights"].sum()) for m in multi for b in m) == single[0]["weights"].sum()


# ---------------------------------------------------------------------------------- tokenizer


def test_stdlib_tokenizer_is_cached_and_round_trips(tok, cache):
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 3)
  assert os.path.dirname(tok.path) == cache and os.path.isfile(tok.path)
  assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]
  text = "def f(x):\n    return x + 1  # add one\n"
  assert tok.decode(tok.encode(text)) == text
  again = tokenizer_lib.load_tokenizer(configs.data_config(), VOCAB)
  assert again.encode(text) == tok.encode(text)
  assert tokenizer_lib.stdlib_model_path(VOCAB) != tokenizer_lib.stdlib_model_path(2 * VOCAB)


def test_vocab_mismatch_is_one_clear_error(tok):
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size=1024.*config\.data\.tokenizer"
                     r".*Fix: set config\.model\.vocab_size=512"):
    tokenizer_lib.check_vocab(tok, 1024)
  tokenizer_lib.check_vocab(tok, VOCAB)
  cfg = configs.data_config()
  cfg.tokenizer = tok.path
  assert tokenizer_lib.load_tokenizer(cfg, VOCAB).vocab_size == VOCAB
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size"):
    tokenizer_lib.load_tokenizer(cfg, 32000)
  cfg.tokenizer = "/nonexistent/spiece.model"
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer.*Fix"):
    tokenizer_lib.load_tokenizer(cfg, VOCAB)


@pytest.mark.parametrize("heldout", [0.05, 0.2])
def test_stdlib_tokenizer_never_sees_a_validation_document(heldout):
  trained_on = tokenizer_lib.training_document_ids(heldout)
  evals = sources.stdlib_split(heldout, "eval")
  assert trained_on and evals and not set(trained_on) & set(evals)
  assert tokenizer_lib.stdlib_model_path(100, heldout) != tokenizer_lib.stdlib_model_path(
      100, heldout / 2)
