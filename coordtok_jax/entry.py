"""The one way every command-line tool starts, as `python -m ...` or as a console script.

absl's --help shows the main module's docstring and key flags. A console script's main module
is pip's wrapper (no docstring, no flags), so without this `coordtok-sample --help` would list
nothing. `run` defines the tool's flags, makes them key flags of whatever module is main, lends
the tool's docstring to a main module that has none, and runs `main`; an error the user can fix
(`UserError`, a missing or existing file, or the tool's own `errors`) is printed as `error: ...`
and the exit status is 2, not a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags

from coordtok_jax.errors import UserError


def run(module_name: str, define_flags: Callable[[], None], main: Callable,
        errors: Sequence[type] = ()) -> None:
    """Entry point of the tool whose flags `define_flags` defines in module `module_name`;
    `errors`: further exception types whose message is the whole story (e.g. ValueError)."""
    define_flags()
    module = sys.modules[module_name]
    defined_in = sys.argv[0] if module_name == "__main__" else module_name
    for flag in flags.FLAGS.get_flags_for_module(defined_in):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__ and module.__doc__:
        main_module.__doc__ = module.__doc__
    reported = (UserError, FileNotFoundError, FileExistsError, *errors)

    def main_reporting_errors(argv):
        try:
            return main(argv)
        except reported as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(main_reporting_errors)
