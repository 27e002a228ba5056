"""UserError: a mistake the user can fix (bad option, missing file). Scripts print it without a trace."""
import sys


class UserError(ValueError):
    pass


def run_script(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
