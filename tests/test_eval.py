"""eval_length: same targets at every length, a known perplexity, the passkey builder, the output files."""
import csv
import importlib.util
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import run_main, run_script, save_tiny_checkpoint, tiny_gpt
from nanococa import evaluate, passkey, report
from nanococa.common import parse_scaling
from nanococa.data import Split, prepare
from nanococa.errors import UserError
from nanococa.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    src = tmp_path_factory.mktemp("docs")
    g = torch.Generator().manual_seed(0)
    for i in range(10):  # nine training files and one validation file (every tenth, sorted)
        n = 3000 if i == 9 else 400
        letters = torch.randint(0, 26, (n,), generator=g)
        (src / f"d{i}.txt").write_text("".join(chr(97 + int(c)) for c in letters))
    return Split(prepare(f"text:{src}", get_tokenizer("bytes"), str(tmp_path_factory.mktemp("cache")),
                         log=lambda *a: None), "val")


def test_same_targets_protocol_scores_identical_ids_at_every_length(split):
    model = tiny_gpt(vocab_size=257)
    windows = evaluate.pick_windows(split, 1024, 64, 5)
    assert len(windows) == 5 and all(e >= 1025 for _, e in windows)
    scored = [evaluate.same_targets_perplexity(model, split, windows, n, 64)[2] for n in (64, 100, 512, 1024)]
    assert all(s == scored[0] for s in scored)
    doc = split.document(0).tolist()
    assert scored[0] == [doc[e - 64:e] for _, e in windows]


def test_constant_logits_give_perplexity_equal_to_the_vocabulary(split):
    model = tiny_gpt(vocab_size=257)
    model.lm_head.weight.data.zero_()  # tied: every logit is 0
    windows = evaluate.pick_windows(split, 256, 32, 3)
    ppl, units, _ = evaluate.same_targets_perplexity(model, split, windows, 256, 32)
    assert ppl == pytest.approx(257, rel=1e-5) and units == pytest.approx([math.log(257)] * 3)
    ppl, units, count = evaluate.sliding_perplexity(model, split, [0], 200, 1000, stride=64)
    assert ppl == pytest.approx(257, rel=1e-5) and count == 1000  # every token scored once
    assert evaluate.bootstrap_interval(units * 2) == pytest.approx((257, 257))


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_windows():
    rng = torch.Generator().manual_seed(0)
    few = (1.5 + 0.3 * torch.randn(6, generator=rng)).tolist()
    many = (1.5 + 0.3 * torch.randn(96, generator=rng)).tolist()
    for units in (few, many):
        lo, hi = evaluate.bootstrap_interval(units)
        assert lo < math.exp(sum(units) / len(units)) < hi
    assert (lambda a, b: a[1] - a[0] > b[1] - b[0])(evaluate.bootstrap_interval(few),
                                                    evaluate.bootstrap_interval(many))
    assert evaluate.bootstrap_interval([1.0]) == (None, None)  # one unit: no interval, not a zero-width one


def test_wilson_interval():
    lo, hi = evaluate.wilson_interval(0, 20)
    assert lo == 0 and 0.1 < hi < 0.2
    lo, hi = evaluate.wilson_interval(10, 20)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * (0.5 - lo))


def test_a_length_beyond_the_longest_document_names_it(split):
    with pytest.raises(UserError, match=r"d9.txt.*3,000"):
        evaluate.pick_windows(split, 4096, 64, 2)


@given(length=st.integers(300, 3000), depth=st.floats(0, 1), key=st.integers(10000, 99999))
def test_passkey_builder_puts_the_key_at_the_requested_depth_and_length(length, depth, key):
    tok = get_tokenizer("bytes")
    ids, at, answer = passkey.build(tok, length, depth, str(key))
    assert len(ids) + len(answer) == length  # the answer's last token sits at position length - 1
    text = tok.decode(ids)
    sentence = f" The pass key is {key}. Remember it. {key} is the pass key. "
    assert text.index(sentence) == at and text.count(f"{key}") == 2
    head, question = len(passkey.TASK), len(passkey.QUESTION)
    filler = length - head - len(sentence) - question - len(answer)
    assert at - head == round(depth * filler)  # the filler before the key is `depth` of all filler
    assert text.endswith(passkey.QUESTION) and tok.decode(answer) == f" {key}"


def test_gpt2_passkey_is_exactly_the_length_asked():
    tok = get_tokenizer("gpt2")
    for n in (512, 1000, 4096):
        ids, at, answer = passkey.build(tok, n, 0.5, "12345")
        assert len(ids) + len(answer) == n and "The pass key is 12345" in tok.decode(ids[at:at + 12])


def test_eval_length_script_writes_documented_json_and_csv(tmp_path, split):
    save_tiny_checkpoint(tmp_path / "coca", block_size=64)
    save_tiny_checkpoint(tmp_path / "alibi", block_size=64, attention="alibi")
    out = run_script("eval_length.py", "--ckpt", tmp_path / "coca", tmp_path / "alibi",
                     "--lengths", "64,128,256",
                     "--target=32", "--windows=3", "--passkey_trials=10",
                     "--scalings=none,dynamic:4+logn,logn",
                     f"--out-dir={tmp_path / 'res'}", f"--data-dir={tmp_path / 'data'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| model | 64 | 128 | 256 |" in out.stdout
    res = json.load(open(tmp_path / "res" / "results.json"))
    assert tuple(res["columns"]) == report.COLUMNS
    assert len(res["results"]) == 18  # 2 models x 3 scalings x 3 lengths
    with open(tmp_path / "res" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == report.COLUMNS and len(rows) == 18
    assert {r["scaling"] for r in rows} == {"none", "dynamic:4+logn", "logn"}
    for r in res["results"]:  # every cell: its windows, and an interval around the value
        assert r["units"] == 3 and len(r["unit_nll"]) == 3
        assert r["perplexity_lo"] <= r["perplexity"] <= r["perplexity_hi"]
        assert r["perplexity"] == pytest.approx(math.exp(sum(r["unit_nll"]) / 3))
    # passkey cells: trials per depth bucket add up, hits within them, one answer-token NLL per answer token
    for r in (r for r in res["results"] if r["passkey_accuracy"] is not None):
        assert sum(r["passkey_depth_trials"]) == 10
        assert all(h <= t for h, t in zip(r["passkey_depth_hits"], r["passkey_depth_trials"]))
        assert sum(r["passkey_depth_hits"]) == round(r["passkey_accuracy"] * 10)
        assert len(r["passkey_answer_nll"]) == 6
        assert r["passkey_lo"] <= r["passkey_accuracy"] <= r["passkey_hi"]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "res" / "results.png").exists() and (tmp_path / "res" / "passkey.png").exists()
    # a passkey too long for the length says so instead of leaving a blank
    short = [r for r in res["results"] if r["length"] == 64]
    assert all(r["passkey_accuracy"] is None and "passkey needs at least" in r["note"] for r in short)
    assert "passkey needs at least" in out.stdout
    # ALiBi has no rotary: dynamic:4+logn is logn there, reported as such, not computed twice
    alibi = {r["scaling"]: r for r in res["results"] if r["attention"] == "alibi" and r["length"] == 256}
    assert alibi["dynamic:4+logn"]["perplexity"] == alibi["logn"]["perplexity"]
    assert "no rotary" in (alibi["dynamic:4+logn"]["note"] or alibi["logn"]["note"])


def test_curves_plot_reads_training_logs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"event": "start", "iter": 0, "config": {"attention": "coca", "seed": 1}}]
    records += [{"event": "eval", "iter": i, "val_loss": 1.0,
                 "ppl_at_length": {"512": 5.0 - i / 100, "2048": 7.0}} for i in (100, 200)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run_script("-m", "nanococa.report", "curves", run, f"--out-dir={tmp_path / 'res'}")
    assert out.returncode == 0, out.stderr
    assert "step 200" in out.stdout and "ppl@2,048 7.00" in out.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text(json.dumps(records[0]) + "\n")
    code, _, err = run_main("nanococa.report", "curves", empty, f"--out-dir={tmp_path / 'res2'}")
    assert code == 2 and "--eval_lengths" in err
    earlier = tmp_path / "res3" / "curves.png"  # written by hand: without matplotlib no plot is made above
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier plot")
    code, _, err = run_main("nanococa.report", "curves", run, f"--out-dir={earlier.parent}")
    assert code == 2 and "curves.png" in err and "--overwrite" in err  # an earlier plot is kept unless asked
    assert earlier.read_bytes() == b"an earlier plot"


def test_checkpoints_with_different_tokenizers_are_refused(tmp_path):
    save_tiny_checkpoint(tmp_path / "a")
    save_tiny_checkpoint(tmp_path / "b", tokenizer="gpt2", vocab_size=50304)
    code, _, err = run_main("eval_length", "--ckpt", tmp_path / "a", tmp_path / "b",
                            f"--out-dir={tmp_path / 'res'}")
    assert code == 2 and "different tokenizers" in err


@pytest.mark.parametrize("argv, words", [
    (["--ckpt", "/no/such/ckpt"], ["no checkpoint"]),
    (["--scalings", "yarn:0.5"], ["scaling", "yarn"]),
    (["--scalings", "dynamic:4+dynamic:2"], ["dynamic"]),
    (["--scalings", "dynamic:nan"], ["finite"]),
    (["--lengths", "512,abc"], ["lengths"]),
    (["--out-dir", "/proc/no-such-place"], ["--out_dir", "cannot be written"]),
    (["--passkey_trials", "1000000000"], ["--passkey_trials", "10,000"]),
    (["--seed", "-1"], ["--seed"]),
    (["--passkey_trials", "-1"], ["--passkey_trials", "between 0"]),
    (["--windows", "0"], ["--windows", "at least 1"]),
    (["--lengths", "512", "--target", "1024"], ["--target=1024", "shortest length"]),
    (["--profile", "--protocol", "sliding"], ["--profile", "sliding"]),
    (["--lengths", "512", "--passkey_lengths", "1K"], ["--passkey_lengths", "among --lengths"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--device", "mps"], ["mps"]),
])
def test_eval_length_script_clear_errors(argv, words):
    code, _, err = run_main("eval_length", *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert all(w in err for w in words), err


def test_merge_joins_evaluations_of_one_plan_and_refuses_another(tmp_path):
    common = ["--lengths", "64,128", "--target=32", "--windows=2", "--scalings=none",
              f"--data_dir={tmp_path / 'data'}"]
    for name in ("a", "b"):
        save_tiny_checkpoint(tmp_path / name, block_size=64, seed=ord(name))
        assert run_main("eval_length", "--ckpt", tmp_path / name, *common,
                        f"--out_dir={tmp_path / ('r' + name)}")[0] == 0
    code, out, err = run_main("nanococa.report", "merge", tmp_path / "ra", tmp_path / "rb",
                              f"--out_dir={tmp_path / 'all'}")
    assert code == 0, err
    rows = json.load(open(tmp_path / "all" / "results.json"))["results"]
    assert {r["checkpoint"] for r in rows} == {str(tmp_path / "a"), str(tmp_path / "b")} and len(rows) == 4
    assert run_main("eval_length", "--ckpt", tmp_path / "a", "--lengths", "64", "--target=32", "--windows=2",
                    f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'rc'}")[0] == 0
    code, _, err = run_main("nanococa.report", "merge", tmp_path / "ra", tmp_path / "rc",
                            f"--out_dir={tmp_path / 'x'}")
    assert code == 2 and "another lengths" in err


def test_merge_refuses_passkey_measured_with_another_trial_count(tmp_path):
    save_tiny_checkpoint(tmp_path / "m", block_size=64)
    for trials in (2, 3):
        assert run_main("eval_length", "--ckpt", tmp_path / "m", "--lengths=300",
                        f"--passkey_trials={trials}",
                        "--scalings=none", "--target=32", "--windows=1",
                        f"--out_dir={tmp_path / str(trials)}",
                        f"--data_dir={tmp_path / 'data'}")[0] == 0
    code, _, err = run_main("nanococa.report", "merge", tmp_path / "2", tmp_path / "3",
                            f"--out_dir={tmp_path / 'x'}")
    assert code == 2 and err.startswith("error: ") and "another passkey_trials" in err, err
    assert not (tmp_path / "x" / "results.json").exists()


def test_passkey_lengths_limits_where_passkey_is_measured(tmp_path):
    save_tiny_checkpoint(tmp_path / "m", block_size=64)
    code, out, err = run_main("eval_length", "--ckpt", tmp_path / "m", "--lengths=300,400",
                              "--passkey_lengths=400",
                              "--passkey_trials=4", "--scalings=none", "--target=32", "--windows=1",
                              f"--out_dir={tmp_path / 'r'}", f"--data_dir={tmp_path / 'data'}")
    assert code == 0, err
    rows = {r["length"]: r for r in json.load(open(tmp_path / "r" / "results.json"))["results"]}
    assert rows[300]["passkey_accuracy"] is None and "--passkey_lengths" in rows[300]["note"]
    assert rows[400]["passkey_trials"] == 4 and sum(rows[400]["passkey_depth_trials"]) == 4


def test_a_table_cell_without_a_value_points_to_one_note_that_says_why():
    why = "passkey not measured at this length (--passkey_lengths)"
    rows = [dict(checkpoint="a", attention="rope", scaling="none", length=n, passkey_accuracy=None, note=why)
            for n in (1024, 2048)]
    rows.append(dict(checkpoint="a", attention="rope", scaling="none", length=512, passkey_accuracy=1.0,
                     passkey_lo=0.93, passkey_hi=1.0))
    table = report.markdown_table(rows, "passkey_accuracy")
    assert "| a (rope, none) | 1.00 (0.93-1.00) | - [1] | - [1] |" in table
    assert table.count(why) == 1 and table.endswith("[1] " + why)


@pytest.mark.parametrize("attention, attn_scale, scaling", [
    ("coca", "none", "none"), ("coca-slack", "none", "yarn:dynamic+logn"), ("rope", "ssmax", "dynamic:4"),
    ("alibi", "none", "logn"), ("coca", "ssmax", "yarn:dynamic")])
def test_attention_weights_are_the_models_own_attention(attention, attn_scale, scaling):
    """Each layer's weights times its values give exactly what the layer's attention computes (before c_proj),
    past the training length with the scalings: the profile measures the model, not a look-alike."""
    model = tiny_gpt(attention, attn_scale=attn_scale, dtype=torch.float64, seed=3)
    ids = torch.randint(0, 61, (70,), generator=torch.Generator().manual_seed(0))
    inputs, outputs = [], []  # each attention layer's input (after ln_1) and its output before c_proj
    hooks = [h for b in model.transformer.h for h in (
        b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0])),
        b.attn.c_proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0][0])))]
    model(ids[None], scaling=parse_scaling(scaling))
    [h.remove() for h in hooks]
    weights = evaluate.attention_weights(model, ids, parse_scaling(scaling))
    for block, w, x, y in zip(model.transformer.h, weights, inputs, outputs):
        assert torch.allclose(w.sum(-1), torch.ones(()).double()) and (w.triu(1) == 0).all()
        v = block.attn.c_attn(x).split(32, dim=1)[2].view(70, 2, 16).transpose(0, 1)
        assert torch.allclose((w @ v).transpose(0, 1).reshape(70, 32), y, atol=1e-12)
    last = evaluate.attention_weights(model, ids, parse_scaling(scaling), queries=5)
    assert all(torch.allclose(a, b[:, -5:], atol=1e-14) for a, b in zip(last, weights))


def test_head_roles_scores_ideal_heads_where_their_roles_say(monkeypatch):
    """With a stand-in attention of two ideal heads (head 0 on the previous token; head 1 on the token after
    the longest earlier match of the text so far, an ideal induction head), head_roles gives head 0 its
    previous-token weight of 1 and head 1 its induction and passkey weights of 1, and nothing across."""
    def ideal(model, ids, scaling=None, queries=None):
        T = ids.numel()
        match = torch.zeros(T, T + 1)  # match[m, n]: how many tokens before n agree with those ending at m
        for m in range(T):
            same = (ids[m] == ids).float()  # same[n - 1] for key n
            prev = match[m - 1, :-1] if m else torch.zeros(T)
            match[m, 1:] = same * (1 + prev)
        match = match[:, :T]
        match[torch.arange(T)[:, None] < torch.arange(T)[None, :]] = -1  # no future keys
        w = torch.zeros(2, T, T)
        m = torch.arange(T)
        w[0, m, (m - 1).clamp(min=0)] = 1
        w[1, m, T - 1 - match.flip(-1).argmax(-1)] = 1  # the latest of the longest matches
        return [w]
    monkeypatch.setattr(evaluate, "attention_weights", ideal)
    model = tiny_gpt("rope", block_size=512, n_layer=1)
    roles = evaluate.head_roles(model, get_tokenizer("bytes"), trials=3)
    assert roles["previous"] == [[1.0, pytest.approx(0.0, abs=0.02)]]
    # (at the first query of the second repeat, a chance two-letter match can beat the one-letter true one)
    assert roles["induction"][0][1] == pytest.approx(1.0, abs=0.01) and roles["induction"][0][0] < 0.02
    assert roles["passkey"] == [[0.0, 1.0]]


def test_profile_prints_and_writes_each_heads_roles(tmp_path):
    save_tiny_checkpoint(tmp_path / "m", block_size=400, n_head=2)
    code, out, err = run_main("eval_length", "--ckpt", tmp_path / "m", "--lengths=400", "--target=32",
                              "--windows=1", "--profile", f"--out_dir={tmp_path / 'p'}",
                              f"--data_dir={tmp_path / 'd'}")
    assert code == 0, err
    heads = json.load(open(tmp_path / "p" / "profile.json"))["heads"][str(tmp_path / "m")]
    assert (tmp_path / "p" / "results.json").exists()  # the profile comes with the evaluation, not instead
    assert {k: (len(v), len(v[0])) for k, v in heads.items()} == {k: (2, 2) for k in heads}
    assert len(heads) == 3
    assert "| induction |" in out and f"| {tmp_path / 'm'} (coca) | 1 |" in out


def test_fisher_exact_matches_the_hypergeometric_tables():
    from nanococa.report import fisher_exact
    # 3 of 4 against 0 of 4, 4/4 against 0/4, 5/6 against 1/6 (two-sided; scipy.stats.fisher_exact agrees)
    assert abs(fisher_exact(3, 1, 0, 4) - 1 / 7) < 1e-12
    assert abs(fisher_exact(4, 0, 0, 4) - 2 / 70) < 1e-12
    assert abs(fisher_exact(5, 1, 1, 5) - 0.0800866) < 1e-6
    assert abs(fisher_exact(2, 2, 2, 2) - 1.0) < 1e-12


def test_rank_sum_exact_matches_the_permutation_counts():
    rank_sum_exact = report.rank_sum_exact
    # fully separated: 2 of the C(8, 4) = 70 splits are as extreme; 3 against 3: 2 of 20
    assert abs(rank_sum_exact([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]) - 2 / 70) < 1e-12
    assert abs(rank_sum_exact([9.0, 8.0, 7.0], [1.0, 2.0, 3.0]) - 0.1) < 1e-12
    # one overlap, 4 against 3: rank sum 11 of mean 16; 2 splits at 11 or below, 2 at 21 or above, of 35
    assert abs(rank_sum_exact([1.0, 2.0, 3.0, 5.0], [4.0, 6.0, 7.0]) - 4 / 35) < 1e-12
    assert rank_sum_exact([1.0, 2.0], [1.0, 2.0]) == 1.0  # ties: mean ranks, nothing to separate


def test_seeds_report_groups_the_grid_by_arm_and_tests_each_pair(tmp_path):
    runs = [{"run": f"runs/{a}-s{s}", "arm": a, "seed": s} for a in ("rope", "coca") for s in (1, 2, 3)]
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    ppl = {"rope": [30.0, 31.0, 29.0], "coca": [14.0, 19.0, 17.0]}
    rows = [{"checkpoint": f"{a}-s{s}", "attention": a, "scaling": sc, "length": n,
             "perplexity": ppl[a][i] * (1 if n == 4096 else 0.1) + (1 if sc == "logn" else 0)}
            for a in ppl for i, s in enumerate((1, 2, 3)) for n in (512, 4096) for sc in ("none", "logn")]
    rows.append({"checkpoint": "other", "attention": "alibi", "scaling": "none", "length": 512,
                 "perplexity": 9.0})
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "results": rows}))
    code, out, err = run_main("nanococa.report", "seeds", tmp_path, f"--out_dir={tmp_path / 'rep'}")
    assert code == 0, err
    doc = json.load(open(tmp_path / "rep" / "seeds.json"))
    (short, long) = doc["lengths"]
    assert long["length"] == 4096
    assert long["arms"]["coca"] == {"seeds": [1, 2, 3], "perplexity": [14.0, 19.0, 17.0]}
    assert long["tests"] == [{"arms": ["rope", "coca"], "p": 0.1}] and "other" not in json.dumps(doc)
    assert "| 4,096 | 30.00, 31.00, 29.00 | 14.00, 19.00, 17.00 |" in out
    assert "| 4,096 | rope vs coca | 3 vs 3 | 0.1 |" in out
    code, _, err = run_main("nanococa.report", "seeds", tmp_path, "--scaling=yarn",
                            f"--out_dir={tmp_path / 'rep2'}")
    assert code == 2
    assert err.strip() == (f"error: seeds: {tmp_path}/results.json has no 'yarn' rows of the runs in its "
                           "runs.json")


def test_a_resumed_runs_seconds_are_its_run_seconds_or_else_the_sum_of_its_parts(tmp_path):
    part = [{"event": "start", "config": {"attention": "rope", "seed": 1}},
            {"event": "eval", "iter": 500, "passkey": 0.5}]
    now = part + [{"event": "end", "iters": 500, "seconds": 10.0, "run_seconds": 10.0}] + part + [
        {"event": "end", "iters": 1000, "seconds": 5.0, "run_seconds": 14.5}]
    older = part + [{"event": "end", "iters": 500, "seconds": 10.0}] + part + [
        {"event": "end", "iters": 1000, "seconds": 5.0}]
    for name, records, seconds in (("now", now, 14.5), ("older", older, 15.0)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert report.read_run(str(tmp_path / f"{name}.jsonl"))["seconds"] == seconds


def test_digit_loss_means_keep_a_stopped_run_at_its_last_evaluation():
    early = {"evals": [(500, 0.0, [0.0, 2.0], 1.5), (1000, 1.0, [0.0, 0.1], 1.4)]}  # learned, stopped
    late = {"evals": [(500, 0.0, [0.0, 2.2], 1.5), (1000, 0.0, [0.0, 2.0], 1.4),
                      (1500, 1.0, [0.0, 0.3], 1.3)]}
    steps, (space, digit) = report.digit_loss_means([early, late])
    assert steps == [500, 1000, 1500] and space == [0.0, 0.0, 0.0]
    assert [round(v, 9) for v in digit] == [2.1, 1.05, 0.2]  # at 1,500 the stopped run counts with 0.1


def test_runs_report_counts_who_learned_by_when_and_tests_the_arms(tmp_path):
    def fake_run(name, attention, seed, accuracies, max_iters=2000):
        folder = tmp_path / name
        folder.mkdir()
        config = {"attention": attention, "seed": seed, "max_iters": max_iters}
        records = [{"event": "start", "config": config}]
        records += [{"event": "eval", "iter": 500 * (i + 1), "val_loss": 1.5 - 0.1 * i, "passkey": a,
                     "passkey_answer_nll": [0.0] + [2.3 * (1 - a)] * 5} for i, a in enumerate(accuracies)]
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return folder
    runs = [fake_run("r1", "rope", 1, [0, 0.95, 1]), fake_run("r2", "rope", 2, [0, 0, 0.9, 1]),
            fake_run("c1", "coca", 1, [0, 0, 0, 0]), fake_run("c2", "coca", 2, [0, 0.5, 0.6, 0.2])]
    code, out, err = run_main("nanococa.report", "runs", *runs, "--by=1500", f"--out_dir={tmp_path / 'rep'}")
    assert code == 0, err
    doc = json.load(open(tmp_path / "rep" / "runs.json"))
    crossing = {r["run"]: r["crossing"] for r in doc["runs"]}
    assert crossing == {str(runs[0]): 1000, str(runs[1]): 1500, str(runs[2]): None, str(runs[3]): None}
    (test,) = doc["tests"]
    assert test["table"] == [[2, 0], [0, 2]] and abs(test["p"] - 1 / 3) < 1e-12
    assert "| rope | 2 / 2 | 1,000, 1,500 |" in out and "not by 2,000" in out
    code, _, err = run_main("nanococa.report", "runs", *runs, runs[2], f"--out_dir={tmp_path / 'rep2'}")
    assert code == 2 and "give each run once" in err  # a run named twice would count twice
    (tmp_path / "c1-copy").mkdir()
    (tmp_path / "c1-copy" / "log.jsonl").write_text((runs[2] / "log.jsonl").read_text())
    code, _, err = run_main("nanococa.report", "runs", *runs, tmp_path / "c1-copy",
                            f"--out_dir={tmp_path / 'rep3'}")
    assert code == 2 and "same arm and seed (coca, seed 1)" in err
    longer = fake_run("c1-long", "coca", 1, [0, 0, 0, 0.9], max_iters=4000)  # same seed, twice the schedule
    code, out, err = run_main("nanococa.report", "runs", *runs, longer, "--by=1500",
                              f"--out_dir={tmp_path / 'rep4'}")
    assert code == 0, err
    arms = {r["run"]: r["arm"] for r in json.load(open(tmp_path / "rep4" / "runs.json"))["runs"]}
    assert arms[str(longer)] == "coca, 4,000-step schedule"
    assert arms[str(runs[2])] == "coca, 2,000-step schedule"
    assert arms[str(runs[0])] == "rope" and "| coca, 4,000-step schedule | 0 / 1 | 2,000 |" in out
