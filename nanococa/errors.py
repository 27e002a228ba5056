"""UserError: a mistake the user can fix (bad option, missing file) or a fault with a clear remedy (a full
disk). Scripts print it as one line `error: ...` and exit with status 2, without a traceback.

One option style for every entry point: `--snake_case` names (nanoGPT's, and the config fields'), given as
`--key=value` or `--key value`; each name is also accepted with dashes (`--max-new-tokens`), so no
documented command breaks. `--help` lists every option with its default.
"""
import argparse
import contextlib
import difflib
import signal
import sys


class UserError(ValueError):
    pass


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the default is None (then the help says what
    happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one line) instead of a usage block, whose options are spelled
    --snake_case and accepted as --dash-case too, and whose help shows every default."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=DefaultsShown, **kw)

    def add_argument(self, *names, **kw):
        kw.setdefault("help", "default: %(default)s")  # an option without help still shows its default
        action = super().add_argument(*names, **kw)
        aliases = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        if aliases:  # the dashed spelling: same destination, hidden from --help, sets nothing unless given
            super().add_argument(*aliases, **{**kw, "dest": action.dest, "default": argparse.SUPPRESS,
                                              "help": argparse.SUPPRESS})
        return action

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            words = message.split(": ", 1)[1].split()
            options = [o for o in self._option_string_actions if o.startswith("--")]
            name = "--" + words[0].split("=")[0].lstrip("-").replace("-", "_")
            guess = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
            message = f"unknown option {' '.join(words)}" + (f"; did you mean {guess[0]}?" if guess else "")
        raise UserError(f"{message} (--help lists the options)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it stops as Ctrl-C stops it (writes in progress finish)."""


def raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def interruptible():
    """Ctrl-C or SIGTERM inside the block (a script's imports, say) ends the program with one line."""
    previous = signal.signal(signal.SIGTERM, raise_terminated) if on_main_thread() else None
    try:
        yield
    except KeyboardInterrupt as e:
        print("\nterminated (SIGTERM)" if isinstance(e, Terminated) else "\ninterrupted", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def on_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def run_script(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130,
    SIGTERM one line and exit status 143."""
    with interruptible():
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
