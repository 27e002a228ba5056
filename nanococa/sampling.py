"""What sample.py and the benchmark share: timed generation (prefill until the first token is known, then
decode tokens/s), a streamer that prints text as tokens arrive, prompt files read with bounds, and the
memory a key/value cache will need, estimated before it is allocated."""
import dataclasses
import os
import resource
import stat
import time

import torch

from .errors import UserError


@dataclasses.dataclass
class Timing:
    tokens: list  # the new tokens of the first row
    prefill_s: float  # from the call until the first new token is known
    decode_tokens_per_s: float  # the tokens after the first, per second


def timed_generation(model, idx, max_new_tokens, on_token=None, **kw):
    """model.generate_stream(idx, max_new_tokens, **kw), timed; on_token(token id) for each token of row 0."""
    times, tokens = [], []
    t0 = time.perf_counter()
    for token in model.generate_stream(idx, max_new_tokens, **kw):
        tokens.append(int(token[0]))  # waits for the device: the token is known now
        times.append(time.perf_counter())
        if on_token:
            on_token(tokens[-1])
    decode = times[-1] - times[0]
    return Timing(tokens, times[0] - t0, (len(times) - 1) / decode if decode > 0 else float("nan"))


class Streamer:
    """Prints tokens as they come; holds back an incomplete UTF-8 character until it completes."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def add(self, token):
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)

    def close(self):
        print(self.tok.decode(self.ids)[self.shown:], flush=True)


def read_prompt_file(path, max_bytes):
    """The text of a prompt file, read no further than max_bytes + 1 bytes (a larger file, or an endless one
    such as /dev/zero, is refused). Returns (text, bytes that were not UTF-8); a file that is mostly not
    text (control characters or bytes that are not UTF-8) is refused."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # with no writer, reading one would wait forever
            raise UserError(f"--prompt_file={path} is a pipe or socket, not a file: save the prompt to a "
                            "file, or give it with --prompt")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"--prompt_file={path}: {e.strerror}") from None
    if len(raw) > max_bytes:
        raise UserError(f"--prompt_file={path} is longer than {max_bytes:,} bytes, more than --max_context "
                        "tokens could hold")
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    noise = replaced + sum(1 for c in text if c < " " and c not in "\n\t\r")
    if text and noise > len(text) / 2:
        raise UserError(f"--prompt_file={path} is mostly not text ({noise:,} of {len(text):,} characters are "
                        "control characters or bytes that are not UTF-8)")
    return text, replaced


def cache_bytes(config, batch_size, max_len, dtype):
    """Bytes of a KVCache for these sizes: keys and values of every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * batch_size * max_len * config.n_embd * element


def free_memory(device):
    """Bytes that can still be allocated on device (CUDA: free on the GPU; CPU: available RAM, and no more
    than a limit on this process's address space, ulimit -v, leaves), or None where it cannot be known."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:  # the address space in use, in pages
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            used = 0
        free = min(free, max(0, limit - used))
    return free


def check_cache_fits(config, batch_size, max_len, dtype, device):
    """A UserError before allocation when the cache for max_len positions would not fit in memory."""
    need, free = cache_bytes(config, batch_size, max_len, dtype), free_memory(device)
    if free is not None and need > 0.9 * free:
        raise UserError(f"a cache of {max_len:,} positions needs {need / 2**30:.1f} GiB on {device}, which "
                        f"has {free / 2**30:.1f} GiB free; ask for fewer tokens (--max_new_tokens, "
                        "--max_context)")
