"""Ctrl-C while the ``headclass`` command is still importing: one line, not a traceback.

``import headclass`` pulls in torch, transformers and TransformerLens (seconds). When the
process is the ``headclass`` command (the console script or ``python -m headclass``), this
module, imported first by ``headclass/__init__.py``, installs a SIGINT handler that prints
``headclass: interrupted while starting; nothing was written.`` and exits with status 130.
:func:`headclass.cli.main` hands SIGINT back to Python (``KeyboardInterrupt``) as soon as it
starts, via :func:`release`. Imported as a library, this module does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["release"]

MESSAGE = "headclass: interrupted while starting; nothing was written."


def _running_as_cli() -> bool:
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1] in ("headclass", "headclass.cli")
    name = os.path.basename(sys.argv[0] if sys.argv else "")
    return name in ("headclass", "headclass.exe", "headclass-script.py")


def _on_sigint(signum: int, frame: object) -> None:
    print(MESSAGE, file=sys.stderr, flush=True)
    raise SystemExit(130)


_installed = False
if _running_as_cli() and threading.current_thread() is threading.main_thread():
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)
            _installed = True
    except (ValueError, OSError):  # pragma: no cover - no signals here
        pass
    if _installed and os.environ.get("HEADCLASS_TEST_PAUSE") == "imports":
        # the interrupt tests' hook (as the CLI's phases): say where we are, then wait for Ctrl-C
        import time

        print("headclass-test: imports", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("HEADCLASS_TEST_PAUSE_S", "20")))


def release() -> None:
    """Give SIGINT back to Python's default handler (``KeyboardInterrupt``), if we took it."""
    global _installed
    if _installed and signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _installed = False
