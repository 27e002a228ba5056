"""UserError: a mistake the user can fix (bad option, missing file) or a fault with a clear remedy (a full
disk). Scripts print it as one line `error: ...` and exit with status 2, without a traceback."""
import argparse
import sys


class UserError(ValueError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one line) instead of a usage block."""

    def error(self, message):
        raise UserError(f"{message} (--help lists the options)")


def run_script(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
