"""eval_length: same targets at every length, a known perplexity, the passkey builder, the output files."""
import csv
import json

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import run_script, save_tiny_checkpoint, tiny_gpt
from nanococa import evaluate
from nanococa.data import Split, prepare
from nanococa.errors import UserError
from nanococa.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    src = tmp_path_factory.mktemp("docs")
    g = torch.Generator().manual_seed(0)
    for i in range(10):  # nine training files and one validation file (every tenth, sorted)
        n = 3000 if i == 9 else 400
        (src / f"d{i}.txt").write_text("".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n,), generator=g)))
    return Split(prepare(f"text:{src}", get_tokenizer("bytes"), str(tmp_path_factory.mktemp("cache")),
                         log=lambda *a: None), "val")


def test_same_targets_protocol_scores_identical_ids_at_every_length(split):
    model = tiny_gpt(vocab_size=257)
    windows = evaluate.pick_windows(split, 1024, 64, 5)
    assert len(windows) == 5 and all(e >= 1025 for _, e in windows)
    scored = [evaluate.same_targets_perplexity(model, split, windows, n, 64)[1] for n in (64, 100, 512, 1024)]
    assert all(s == scored[0] for s in scored)
    doc = split.document(0).tolist()
    assert scored[0] == [doc[e - 64:e] for _, e in windows]


def test_constant_logits_give_perplexity_equal_to_the_vocabulary(split):
    model = tiny_gpt(vocab_size=257)
    model.lm_head.weight.data.zero_()  # tied: every logit is 0
    windows = evaluate.pick_windows(split, 256, 32, 3)
    ppl, _ = evaluate.same_targets_perplexity(model, split, windows, 256, 32)
    assert ppl == pytest.approx(257, rel=1e-5)
    ppl, count = evaluate.sliding_perplexity(model, split, [0], 200, 1000, stride=64)
    assert ppl == pytest.approx(257, rel=1e-5) and count == 1000  # every token scored once


def test_a_length_beyond_the_longest_document_names_it(split):
    with pytest.raises(UserError, match=r"d9.txt.*3,000"):
        evaluate.pick_windows(split, 4096, 64, 2)


@given(length=st.integers(300, 3000), depth=st.floats(0, 1), key=st.integers(10000, 99999))
def test_passkey_builder_puts_the_key_at_the_requested_depth_and_length(length, depth, key):
    tok = get_tokenizer("bytes")
    ids, at, answer = evaluate.build_passkey(tok, length, depth, str(key))
    assert len(ids) == length
    text = tok.decode(ids)
    sentence = f" The pass key is {key}. Remember it. {key} is the pass key. "
    assert text.index(sentence) == at and text.count(f"{key}") == 2
    head, question = len(evaluate.PASSKEY_TASK), len(evaluate.PASSKEY_QUESTION)
    filler = length - head - len(sentence) - question
    assert at - head == round(depth * filler)  # the filler before the key is `depth` of all filler
    assert text.endswith(evaluate.PASSKEY_QUESTION) and tok.decode(answer) == f" {key}"


def test_gpt2_passkey_is_exactly_the_length_asked():
    tok = get_tokenizer("gpt2")
    for n in (512, 1000, 4096):
        ids, at, _ = evaluate.build_passkey(tok, n, 0.5, "12345")
        assert len(ids) == n and "The pass key is 12345" in tok.decode(ids[at:at + 12])


def test_eval_length_script_writes_documented_json_and_csv(tmp_path, split):
    save_tiny_checkpoint(tmp_path / "ckpt", block_size=64)
    out = run_script("eval_length.py", "--ckpt", tmp_path / "ckpt", "--lengths", "64,128,256", "--target=32",
                     "--windows=2", "--passkey-trials=1", f"--out-dir={tmp_path / 'res'}", f"--data-dir={tmp_path / 'data'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| model | 64 | 128 | 256 |" in out.stdout
    res = json.load(open(tmp_path / "res" / "results.json"))
    assert tuple(res["columns"]) == evaluate.COLUMNS and len(res["results"]) == 6  # 2 scalings x 3 lengths
    with open(tmp_path / "res" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == evaluate.COLUMNS and len(rows) == 6
    assert {r["scaling"] for r in rows} == {"none", "dynamic:4"}


@pytest.mark.parametrize("argv, words", [
    (["--ckpt", "/no/such/ckpt"], ["no checkpoint"]),
    (["--scalings", "yarn:2"], ["scaling"]),
    (["--lengths", "512,abc"], ["lengths"]),
])
def test_eval_length_script_clear_errors(argv, words):
    out = run_script("eval_length.py", *argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert all(w in out.stderr for w in words), out.stderr
