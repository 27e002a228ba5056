"""Passkey retrieval (Mohtashami and Jaggi, 2023): one source for the text that training mixes in
(--passkey_mix) and that evaluation scores (eval_length.py --passkey_trials).

A passkey text of length L is the task line, filler sentences with the key sentence at a chosen depth,
the question, and the answer: " NNNNN", the five digits of the key. Its last answer token sits at
position L - 1, so "passkey at 512" fits a 512-token training window exactly, as perplexity at 512
scores tokens with at most 512 tokens of context.

Scoring is greedy decoding, done in one forward pass: greedy decoding writes the answer exactly when,
at each answer position, the most likely next token given the prompt and the answer so far is the
answer's next token; one forward pass over prompt + answer shows every one of those argmaxes at once
(tests/test_passkey.py checks it against cached generation). The same pass gives each answer token's
negative log-likelihood, which moves long before accuracy does while a model learns the task.
"""
import functools
import random

import torch
import torch.nn.functional as F

from .errors import UserError

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEPTH_BUCKETS = 10  # evaluation: trial i has its key in depth bucket i % 10, so every bucket gets its share


@functools.lru_cache(maxsize=8)
def fixed_parts(tok):
    """Token ids of the task line, one filler round and the question (encoded once per tokenizer)."""
    return tok.encode(TASK), tok.encode(FILLER), tok.encode(QUESTION)


def key_sentence(tok, key):
    return tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")


def answer_ids(tok, key):
    return tok.encode(f" {key}")


@functools.lru_cache(maxsize=8)
def min_length(tok):
    """The shortest length in tokens that has room for a passkey text (prompt + answer, no filler) with any
    key: the longest fixed text over all 90,000 keys (with GPT-2's tokens a key takes 1 to 3 tokens, so
    the texts of different keys differ in length; about 0.4 s, once per tokenizer)."""
    task, _, question = fixed_parts(tok)
    keys = range(10000, 100000)
    return len(task) + len(question) + max(len(key_sentence(tok, k)) + len(answer_ids(tok, k)) for k in keys)


def build(tok, length, depth, key):
    """(prompt ids, index of the key sentence's first token, answer ids), len(prompt) + len(answer) == length,
    with the key sentence after `depth` (0..1) of the filler."""
    task, one, question = fixed_parts(tok)
    info, answer = key_sentence(tok, key), answer_ids(tok, key)
    n_filler = length - len(task) - len(info) - len(question) - len(answer)
    if n_filler < 0:
        raise UserError(f"a passkey text of {length} tokens is shorter than its fixed text "
                        f"({length - n_filler} tokens)")
    filler = (one * (n_filler // len(one) + 1))[:n_filler]
    cut = round(depth * n_filler)
    return task + filler[:cut] + info + filler[cut:] + question, len(task) + cut, answer


def random_key(draw):
    """Five digits, first one not 0, from draw(n) -> an integer in [0, n)."""
    return str(10000 + draw(90000))


def training_tokens(tok, n, generator):
    """n token ids for one training row: passkey texts (prompt, answer, end-of-text) of random lengths
    from min_length to n - 1, random keys and depths, packed one after another; the last one is cut off
    where the row ends. Every draw comes from the torch generator, so a resumed run repeats them."""
    def draw(k):
        return int(torch.randint(k, (1,), generator=generator))
    lo, ids = min_length(tok), []
    if n - 1 < lo:
        raise UserError(f"a row of {n} tokens has no room for a passkey text ({lo} tokens and an "
                        "end-of-text)")
    while len(ids) < n:
        length, depth = lo + draw(n - lo), draw(10_001) / 10_000
        prompt, _, answer = build(tok, length, depth, random_key(draw))
        ids += prompt + answer + [tok.eot]
    return ids[:n]


def mix_into(x, y, tok, fraction, generator):
    """Replace each row of a batch (x, y: (B, T), y is x shifted by one) with passkey text with probability
    `fraction`; the rows are changed in place. Nothing is drawn when fraction is 0."""
    if fraction <= 0:
        return x, y
    for row in (torch.rand(x.size(0), generator=generator) < fraction).nonzero()[:, 0].tolist():
        ids = torch.tensor(training_tokens(tok, x.size(1) + 1, generator), dtype=x.dtype)
        x[row], y[row] = ids[:-1].to(x.device), ids[1:].to(y.device)
    return x, y


@torch.no_grad()
def score(model, tok, length, trials, scaling=None, seed=0, device="cpu", batch_size=8):
    """Greedy passkey retrieval at one length: a dict of per-trial depths, hits (the key written exactly)
    and the NLL of each answer token. Keys and depths come from (seed, length); trial i's depth is in bucket
    i % DEPTH_BUCKETS. Dynamic rotary scalings are sized for prompt + answer, as a cache would be."""
    rng = random.Random(seed * 1_000_003 + length)
    cases = []
    for i in range(trials):
        key = random_key(rng.randrange)
        depth = (i % DEPTH_BUCKETS + rng.random()) / DEPTH_BUCKETS
        prompt, _, answer = build(tok, length, depth, key)
        cases.append((depth, prompt, answer))
    hits, nll = [None] * trials, [None] * trials
    by_shape = {}  # GPT-2 answers differ in length: batch the trials whose prompt and answer lengths agree
    for i, (_, prompt, answer) in enumerate(cases):
        by_shape.setdefault((len(prompt), len(answer)), []).append(i)
    for (p, a), members in by_shape.items():
        for s in range(0, len(members), batch_size):
            group = members[s:s + batch_size]
            ids = torch.tensor([cases[i][1] + cases[i][2] for i in group], device=device)
            logits = model.lm_head(model.hidden(ids, scaling=scaling)[:, p - 1:p + a - 1]).float()
            target = ids[:, p:]
            greedy = (logits.argmax(-1) == target).all(-1)
            token_nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            for j, i in enumerate(group):
                hits[i], nll[i] = bool(greedy[j]), token_nll[j].tolist()
    return dict(depths=[c[0] for c in cases], hits=hits, nll=nll)


def depth_buckets(depths, hits, buckets=DEPTH_BUCKETS):
    """[(hits, trials)] per depth bucket [b / buckets, (b + 1) / buckets)."""
    out = [[0, 0] for _ in range(buckets)]
    for d, h in zip(depths, hits):
        b = min(int(d * buckets), buckets - 1)
        out[b][0] += bool(h)
        out[b][1] += 1
    return [tuple(x) for x in out]
