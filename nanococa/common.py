"""What every script shares and the training loop does not own: device and dtype resolution, the
allowed dtypes, a GPU's peak FLOPs for MFU, the grammars of lengths (512,1K,2K) and of context
extension (dynamic:4+logn), time formatting, a method's display name, an advisory file lock (one
writer per output folder or data cache), and atomic writes (a file is replaced whole or not at all)."""
import contextlib
import errno
import math
import os
import re
import signal
import threading

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs are then the user's care
    fcntl = None

from .errors import Terminated, UserError
from .model import Scaling

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"

# Dense bf16 tensor-core peak (FLOP/s) of the GPUs we can name exactly. Anything else gets no MFU
# figure: a guessed peak would print a wrong number with a straight face.
PEAK_BF16_FLOPS = (
    (r"H100.*(PCIe)", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100.*(SXM|HBM3)", 989e12),
    (r"H200.*NVL", 835e12),
    (r"\bH200\b", 989e12),
    (r"\bA100\b", 312e12),
    (r"\bL4\b", 121e12),
    (r"RTX 4090", 165e12),
)


def resolve_device(name, local_rank=0):
    """"auto" -> cuda:<local_rank>, else mps, else cpu; an unavailable or unknown device is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device=mps: the Apple GPU backend is not available here; use --device=cpu")
        return name
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise UserError(f"--device={name}: CUDA is not available here; use --device=cpu")
        index = int(name[5:]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    raise UserError(f"--device={name!r} is not one of {DEVICES}")


def resolve_dtype(name, device):
    """"auto" is bf16 on CUDA and float32 elsewhere; any other name of DTYPES is taken as given."""
    if name not in DTYPES:
        raise UserError(f"--dtype={name!r} is not one of {', '.join(DTYPES)}")
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


def peak_flops(device):
    """Dense bf16 peak of the CUDA device, or None where it is not a GPU we know exactly."""
    if not device.startswith("cuda"):
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


def gpu_peak_flops(gpu_name):
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, gpu_name)), None)


def parse_lengths(text):
    """"512,1K,2K" -> [512, 1024, 2048] (sorted, unique); K means 1024. ValueError names what is wrong."""
    try:
        values = [int(x[:-1]) * 1024 if x[-1] in "kK" else int(x)
                  for x in map(str.strip, text.split(",")) if x]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of lengths (e.g. 512,1K,2K)") from None
    if not values or min(values) < 2:
        raise ValueError(f"{text!r}: lengths must be at least 2")
    return sorted(set(values))


ROPE_SCALINGS = {"dynamic": "dynamic", "linear": "linear", "yarn": "yarn"}  # text kind -> Scaling.rope
SCALING_HELP = "none, dynamic:F, linear:F, yarn:F, yarn:dynamic or logn, or a +-joined mix (dynamic:4+logn)"


def parse_scaling(text):
    """A "+"-joined mix of none, dynamic:F (dynamic NTK), linear:F (position interpolation), yarn:F
    (YaRN, scale F), yarn:dynamic (YaRN, scale L / L_train) and logn, with at most one rope scaling and
    each kind at most once -> Scaling. ValueError names what is wrong."""
    rope, factor, logn, seen = None, 1.0, False, set()
    for part in str(text).split("+"):
        kind, colon, value = part.strip().partition(":")
        if kind in seen or (rope and kind in ROPE_SCALINGS):
            raise ValueError(f"scaling {text!r}: {kind} and another rope scaling or itself in one entry; "
                             "combine at most one of dynamic:F / linear:F / yarn:F / yarn:dynamic with logn")
        seen.add(kind)
        if kind in ("none", "logn") and not colon:
            logn = logn or kind == "logn"
        elif kind == "yarn" and value == "dynamic":
            rope = "yarn-dynamic"
        elif kind in ROPE_SCALINGS and colon:
            try:
                factor = float(value)
            except ValueError:
                raise ValueError(f"scaling {text!r}: factor {value!r} is not a number") from None
            if not 1.0 <= factor < math.inf:
                raise ValueError(f"scaling {text!r}: factor {value} must be finite and at least 1")
            rope = ROPE_SCALINGS[kind]
        else:
            raise ValueError(f"scaling {text!r}: {part!r} is not one of {SCALING_HELP}")
    return Scaling(rope, factor, logn)


POSITIONS_HELP = ("contiguous; pose:R (PoSE: two chunks, the second shifted by a random skip, so distances "
                  "reach R - 1) or random:R (a sorted random sample of 0 .. R-1), R like 16K")


def parse_positions(text):
    """Training positions: "contiguous" -> None, "pose:16K" -> ("pose", 16384), "random:16K" ->
    ("random", 16384). ValueError names what is wrong."""
    kind, colon, reach = str(text).strip().partition(":")
    if kind == "contiguous" and not colon:
        return None
    if kind not in ("pose", "random") or not colon or "," in reach:
        raise ValueError(f"positions {text!r} is not one of: {POSITIONS_HELP}")
    return kind, parse_lengths(reach)[0]


def fmt_length(n):
    """2048 -> "2K", 1000 -> "1000": a length as the options write it."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def fmt_time(s):
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def open_new_or_own(path, mode="a"):
    """Open a file this program writes (a log, a lock) for appending ("a") or afresh ("w"), refusing a
    symbolic link there: following one would write into a file elsewhere. Returns a text file object."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.fdopen(os.open(path, flags, 0o644), mode)
    except OSError as e:
        if os.path.islink(path):
            raise UserError(f"{path} is a symbolic link; nanococa writes only files it owns there: remove "
                            "the link or choose another folder") from None
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None


@contextlib.contextmanager
def file_lock(path, wait=True, busy_message=None, log=None, owner=None):
    """Hold an exclusive advisory lock on the file `path` (created if needed) for the block. The lock
    dies with its process, so a killed run never leaves it held. owner (e.g. "train.py") is written into
    the file, so a refusal can say who holds it. wait=False: a lock already held by another process is a
    UserError(busy_message) instead of a wait."""
    if fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open_new_or_own(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                holder = held_by(path)
                who = f": {holder} is writing there" if holder else ": another process holds it"
                raise UserError(f"{busy_message or f'{path} is locked'}{who}; wait for it or choose another "
                                "folder") from None
            if log:
                log(f"waiting for another process that holds {path} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        if owner:
            f.truncate(0)
            f.write(f"{owner} (pid {os.getpid()})")
            f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def held_by(path):
    """Who wrote the lock file at path: "train.py (pid 123)", or "" when it does not say."""
    try:
        with open(path) as f:
            return f.read(200).strip()
    except OSError:
        return ""


NAMED_CORPORA = ("shakespeare", "pycode")


def corpus_of(ckpt, given, path):
    """The corpus to read for a checkpoint: the user's own --corpus, else the checkpoint's when it names a
    bundled one. A text:PATH or hf:NAME corpus that only a checkpoint names (and a checkpoint may come from
    anyone) is read only when the user names it too: it could point anywhere on this machine."""
    if given:
        return given
    corpus = (ckpt.get("train_config") or {}).get("corpus", "shakespeare")
    if corpus not in NAMED_CORPORA:
        raise UserError(f"{path} was trained on the corpus {str(corpus)[:200]!r}; a corpus that is a path or "
                        f"a dataset is read only when you name it: give --corpus={str(corpus)[:200]} (or "
                        "another)")
    return corpus


@contextlib.contextmanager
def memory_errors(what):
    """Running out of memory inside the block (CPU or GPU) is one UserError naming what ran out."""
    try:
        yield
    except MemoryError:
        raise UserError(f"out of memory in {what}") from None
    except RuntimeError as e:
        if not any(w in str(e) for w in ("out of memory", "can't allocate memory", "not enough memory")):
            raise
        raise UserError(f"out of memory in {what}: {str(e).splitlines()[0][:120]}") from None


def method_name(attention, attn_scale):
    """How a model's attention is named in logs, tables and plots: "coca", "rope+ssmax", ..."""
    return attention + ("+ssmax" if attn_scale == "ssmax" else "")


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C (and SIGTERM) inside the block is held back and raised when the block ends, so a write is never
    cut in half (which can abort inside torch's writer instead of exiting)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise Terminated if signal.SIGTERM in caught and signal.SIGINT not in caught else KeyboardInterrupt


TMP_SUFFIX = ".tmp."
WRITE_FAILURES = ("unexpected pos", "failed writing", "PytorchStreamWriter")  # torch.save on a full disk


def atomic_write(path, write, mode="wb", what="file"):
    """write(f) into a temporary file beside path, fsync, then rename it over path: an interrupted or
    failed write never leaves a half-written file where the last good one was, and Ctrl-C waits for
    the rename. A full disk (or any failed write) is one UserError; the temporary file is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        with sigint_deferred():
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        full = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise UserError(f"could not write the {what} {path} ({e.strerror or e}){full}; "
                        f"the previous {path}, if any, is unchanged") from None
    except RuntimeError as e:
        if not any(w in str(e) for w in WRITE_FAILURES):
            raise
        raise UserError(f"could not write the {what} {path} (the write stopped short: is the disk full?); "
                        f"the previous {path}, if any, is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
