"""Tokenizers (offline, round trips, known GPT-2 ids) and corpora (splits, idempotent preparation, errors)."""
import json
import os
import socket

import numpy as np
import pytest
from hypothesis import given, strategies as st

from nanococa import data
from nanococa.errors import UserError
from nanococa.tokenizer import GPT2Tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@given(text=st.text(max_size=300))
def test_byte_tokenizer_round_trips_unicode(text):
    tok = get_tokenizer("bytes")
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids + [tok.eot]) == text


@given(text=st.text(max_size=300))
def test_gpt2_round_trips_unicode(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("<|endoftext|>") != [50256]  # text, not the special token
    assert gpt2.eot == 50256 and gpt2.vocab_size == 50257


def test_gpt2_loads_with_the_network_off(monkeypatch):
    def no_network(*a, **k):
        raise OSError("network is off in this test")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cached copy to fall back on
    assert GPT2Tokenizer().encode("Hello, world!") == [15496, 11, 995, 0]


def test_gpt2_refuses_a_corrupted_file(tmp_path):
    from nanococa.tokenizer import gpt2_files_dir
    for f in ("vocab.bpe", "encoder.json"):
        (tmp_path / f).write_bytes(open(os.path.join(gpt2_files_dir(), f), "rb").read())
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="SHA-256"):
        GPT2Tokenizer(str(tmp_path))


def test_unknown_tokenizer():
    with pytest.raises(UserError, match="gpt2"):
        get_tokenizer("sentencepiece")


def test_shakespeare_prepares_idempotently_and_keeps_validation_plays_out(tmp_path):
    tok = get_tokenizer("bytes")
    folder = data.prepare("shakespeare", tok, str(tmp_path), log=lambda *a: None)
    stamp = os.path.getmtime(os.path.join(folder, "train.bin"))
    logs = []
    assert data.prepare("shakespeare", tok, str(tmp_path), log=logs.append) == folder
    assert os.path.getmtime(os.path.join(folder, "train.bin")) == stamp and "reusing" in logs[0]
    train, val = data.Split(folder, "train"), data.Split(folder, "val")
    assert sorted(val.names) == sorted(data.VAL_PLAYS)
    assert not set(train.names) & set(data.VAL_PLAYS) and len(train.names) >= 30
    # no validation play's text appears in the training tokens
    train_text = tok.decode(np.asarray(train.tokens).tolist())
    for i in range(len(val.names)):
        passage = tok.decode(val.document(i)[5000:5400].tolist())
        assert passage not in train_text
    # documents are separated by end-of-text tokens at the recorded offsets
    assert all(train.tokens[o - 1] == tok.eot for o in train.offsets[1:])
    assert tok.decode(val.document(0)[:8].tolist()) == "# Hamlet"


def test_text_folder_is_prepared_once_and_again_when_it_changes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02d}.txt").write_text(f"document {i} " * 50)
    tok = get_tokenizer("bytes")
    cache = str(tmp_path / "cache")
    folder = data.prepare(f"text:{src}", tok, cache, log=lambda *a: None)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["splits"]["val"]["documents"] == ["f09.txt"]
    logs = []
    data.prepare(f"text:{src}", tok, cache, log=logs.append)
    assert "reusing" in logs[0]
    (src / "f03.txt").write_text("changed")  # a changed corpus is prepared again
    logs = []
    data.prepare(f"text:{src}", tok, cache, log=logs.append)
    assert "reusing" not in logs[0]


def test_single_text_file_splits_its_last_tenth(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    docs = data.text_docs(str(path))
    assert docs["train"][0][1] + docs["val"][0][1] == path.read_text()
    assert docs["val"][0][1].startswith("line 9")


@pytest.mark.parametrize("corpus, words", [
    ("wikipedia", ["unknown corpus", "shakespeare", "text:PATH"]),
    ("text:/no/such/place", ["no such file"]),
])
def test_bad_corpus_is_a_clear_error(corpus, words, tmp_path):
    with pytest.raises(UserError) as e:
        data.prepare(corpus, get_tokenizer("bytes"), str(tmp_path))
    assert all(w in str(e.value) for w in words)


def test_hf_corpus_without_datasets_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UserError, match="datasets"):
        data.load_docs("hf:wikitext:wikitext-2-raw-v1")


def test_pycode_splits_by_package():
    docs = data.pycode_docs()
    train_names = {n for n, _ in docs["train"]}
    assert {n for n, _ in docs["val"]} == set(data.VAL_PACKAGES)
    assert not train_names & set(data.VAL_PACKAGES) and "collections" in train_names
    assert "# file: json/decoder.py" in dict(docs["val"])["json"]


@given(B=st.integers(1, 6), T=st.integers(2, 300), reach_extra=st.integers(0, 20_000),
       seed=st.integers(0, 10_000), kind=st.sampled_from(["pose", "random"]))
def test_training_positions_increase_and_stay_within_reach(B, T, reach_extra, seed, kind):
    import torch
    reach = T + reach_extra
    pos = data.training_positions((kind, reach), B, T, torch.Generator().manual_seed(seed))
    again = data.training_positions((kind, reach), B, T, torch.Generator().manual_seed(seed))
    assert pos.shape == (B, T) and torch.equal(pos, again)
    assert (pos[:, 1:] > pos[:, :-1]).all() and pos.min() >= 0 and pos.max() < reach
    if kind == "pose":  # two runs of consecutive positions: the first from 0, at most half the window long
        jumps = pos.diff(dim=-1) - 1
        assert ((jumps > 0).sum(-1) <= 1).all() and (pos[:, 0] == 0).all()
        first = torch.where(jumps > 0, torch.arange(1, T), T).min(-1).values  # where the second chunk starts
        assert (first <= (T + 1) // 2).all() or (jumps == 0).all()


def test_pose_distances_cover_the_reach_and_contiguous_draws_nothing():
    import torch
    gen = torch.Generator().manual_seed(0)
    pos = data.training_positions(("pose", 16384), 4000, 512, gen)
    longest = pos[:, -1] - pos[:, 0]
    assert longest.max() > 16000 and longest.min() < 1024  # skips spread over [0, reach - T]
    state = gen.get_state()
    assert data.training_positions(None, 8, 512, gen) is None and torch.equal(gen.get_state(), state)
