"""How the node and the workers start Python child processes: in isolated mode.

``python -m module`` puts the current folder first on the child's import path: started from a
folder that holds a file or folder named like a module the child imports (a stray ``dl/``, a
``pydicom.py``), the child imports that instead, which for a service running as root from a
shared folder is a way to run someone else's code. ``-I`` leaves the current folder and the
user's site-packages off the path and ignores ``PYTHON*`` environment variables; the child finds
the project and its dependencies where this interpreter has them installed.
"""

from __future__ import annotations

import signal
import sys


def python_module_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` with this interpreter, isolated from the cwd."""
    return [sys.executable, "-I", "-m", module, *args]


def exit_reason(code: int | None) -> str:
    """A child's end as a person reads it: 'killed by SIGABRT', 'exit status 1'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
