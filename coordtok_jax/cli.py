"""The one way every command-line tool starts, as `python -m ...` or as a console script.

The convention: every tool is `python -m coordtok_jax.TOOL` and the console script
`coordtok-TOOL` (setup.py). Both call the `run()` of the module that holds the tool (`run()` is
one line: `cli.run(__name__, define_flags, main, errors)`), reached through an entry module that
only imports it: `coordtok_jax/TOOL.py` (reconstruct, train_sit, sample, encode_latents, prepare;
compile and demo hold their tool themselves) or a package's `__main__.py` (train, evaluate,
convert).

absl's --help shows the main module's docstring and key flags. The main module is the entry
module or pip's wrapper (no flags), so `run` defines the tool's flags, makes them key flags of
whatever module is main, lends it the tool's docstring, and runs `main`; an error the user can fix
(`UserError`, a missing or existing file, or the tool's own `errors`) is printed as `error: ...`
and the exit status is 2, not a traceback. Flags are absl's underscore names; the dashed spelling
of any of them (`--num-videos`) is accepted as an alias. `--help` exits 0; a flag or config
override that does not parse (an unknown field, a bad value, a missing config file) is one
`error: ...` line (with absl's "did you mean" suggestion) and exit status 2.

On a CPU host, `run` first re-executes the tool under a page-retaining allocator when one is
installed (tcmalloc or jemalloc; coordtok_jax/allocator.py says why and how to opt out).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from coordtok_jax import allocator
from coordtok_jax.errors import UserError


def run(module_name: str, define_flags: Callable[[], None], main: Callable, errors: Sequence[type] = (), *,
        required: Sequence[str] = (), positional: bool = False, hint: str = "", log_level: str = "error") -> None:
    """Entry point of the tool whose flags `define_flags` defines in module `module_name`;
    `errors`: further exception types whose message is the whole story (e.g. ValueError).

    The preamble every tool shares, before `main(argv)`: the flags in `required` must be given
    ("--a and --b are required{hint} (see --help)"), positional arguments are refused unless
    `positional`, and absl logging shows `log_level` and above (Orbax logs every save at INFO;
    trainers keep their warnings) unless --verbosity is given. On a CPU host the tool first
    re-executes itself under a page-retaining allocator when one is installed (allocator.py)."""
    if not any(a in HELP for a in sys.argv[1:]):
        try:
            allocator.reexec()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    define_flags()
    module = sys.modules[module_name]
    defined_in = sys.argv[0] if module_name == "__main__" else module_name
    for flag in flags.FLAGS.get_flags_for_module(defined_in):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None and main_module is not module and module.__doc__:
        main_module.__doc__ = module.__doc__  # --help documents the tool, not its entry module
    reported = (UserError, FileNotFoundError, FileExistsError, *errors)

    def main_reporting_errors(argv):
        if len(argv) > 1 and not positional:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        missing = [f"--{name}" for name in required if flags.FLAGS[name].value in (None, "")]
        if missing:
            raise app.UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required{hint} "
                                 "(see --help)")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(log_level)
        try:
            return main(argv)
        except reported as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.define_help_flags()
    argv = dashed_aliases(sys.argv)
    if any(a in HELP for a in argv[1:]):  # absl prints the usage and exits 1; asking for help is no error
        try:
            flags.FLAGS(argv)
        except SystemExit as e:
            sys.exit(0 if e.code in (None, 0, 1) else e.code)
        except Exception:  # noqa: BLE001 - other flags may be wrong; the usage is what was asked for
            app.usage(shorthelp=True, writeto_stdout=True)
            sys.exit(0)
    try:  # parse first, so that a flag or config override that does not parse is one error line
        remaining = flags.FLAGS(argv)
        for name in flags.FLAGS:  # config files load lazily: a missing one fails on first use
            value = flags.FLAGS[name].value
            if type(value).__name__ == "_ErrorConfig":
                getattr(value, "keys")
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError, UserError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    app.run(main_reporting_errors, argv=argv, flags_parser=lambda _: remaining)  # parsed once (config overrides
    # define their flags while parsing: a second parse would define them twice)


HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def one_line(message: str) -> str:
    """A message on one line; an embedded traceback is reduced to its final exception line."""
    head, sep, tail = message.partition("Traceback (most recent call last):")
    if sep:
        last = [line for line in tail.splitlines() if line.strip()][-1:]
        message = head + " " + " ".join(last)
    return " ".join(part.strip() for part in message.splitlines() if part.strip()).replace("\\n", " ")


def dashed_aliases(argv: Sequence[str]) -> list[str]:
    """`--num-videos=3` -> `--num_videos=3` when `num_videos` is a defined flag (also --no-...)."""
    out = list(argv[:1])
    for arg in argv[1:]:
        if arg == "--":
            out.extend(argv[len(out):])
            break
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, eq, value = arg[2:].partition("=")
            fixed = name.replace("-", "_")
            if fixed in flags.FLAGS:
                arg = f"--{fixed}{eq}{value}"
            elif name.startswith("no-") and name[3:].replace("-", "_") in flags.FLAGS:  # --no-side-by-side
                arg = f"--no{name[3:].replace('-', '_')}{eq}{value}"
        out.append(arg)
    return out

