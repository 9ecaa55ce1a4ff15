"""The entry point: every command module registered on the app, and one ``error:`` line for what goes wrong.
"""

from __future__ import annotations

import os
import sys

import typer

from microstructure.cli import ingest, lake, research, serve  # noqa: F401  (importing a module registers its commands)
from microstructure.cli.app import UserError, app


def main() -> None:
    # Typer vendors its own click; its public names cover Exit/Abort, the usage errors live here.
    from typer._click import exceptions as cx

    from microstructure.contract.inputs import InputError  # an error line shows data's control characters escaped
    from microstructure.contract.text import visible
    from microstructure.sources.secrets import scrub

    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except (UserError, InputError) as e:
        print(visible(scrub(f"error: {e}".splitlines()[0])), file=sys.stderr)
        sys.exit(2)
    except cx.NoArgsIsHelpError:
        sys.exit(0)
    except cx.UsageError as e:  # a bad option or choice: one line, with where to look
        cmd = f"microstructure {e.ctx.info_name} --help" if e.ctx and e.ctx.parent else "microstructure --help"
        # Click lists a choice option's choices on lines of their own: joined, so the one line still names them.
        msg = " ".join(part.strip() for part in e.format_message().splitlines() if part.strip())
        print(visible(scrub(f"error: {msg} (see `{cmd}`)")), file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # one line for the user; MICROSTRUCTURE_DEBUG=1 for the traceback
        if os.environ.get("MICROSTRUCTURE_DEBUG"):
            raise
        print(visible(scrub(f"error: {type(e).__name__}: {e}".splitlines()[0])), file=sys.stderr)
        sys.exit(1)
