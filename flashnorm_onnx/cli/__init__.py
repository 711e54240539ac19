"""``flashnorm-onnx``: the command line, one module per subcommand (optimize, inspect, profile,
export), a thin layer over :mod:`flashnorm_onnx.pipeline.api`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import warnings

from flashnorm_onnx import __version__
from flashnorm_onnx.cli.common import EPILOG_EXIT_CODES
from flashnorm_onnx.errors import ORT_MISSING, FlashNormError, ProviderUnavailable


def version_text() -> str:
    """``--version``: this tool's version and what a bug report needs beside it (Python, onnx,
    onnx-ir, the ONNX Runtime package, its providers). Works without ONNX Runtime."""
    import importlib.metadata as md
    import platform

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    lines = [
        f"flashnorm-onnx {__version__}",
        f"python {platform.python_version()} ({platform.system()} {platform.machine()})",
    ]
    lines += [f"{dist} {version(dist) or 'not installed'}" for dist in ("onnx", "onnx-ir")]
    try:
        # which distributions install the `onnxruntime` module (onnxruntime, onnxruntime-gpu, ...)
        families = sorted(set(md.packages_distributions().get("onnxruntime", [])))
    except Exception:  # pragma: no cover - unreadable metadata
        families = []
    try:
        import onnxruntime as ort
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            lines.append("onnxruntime not installed (pip install 'flashnorm-onnx[cpu]' or 'flashnorm-onnx[gpu]')")
        else:
            from flashnorm_onnx.errors import first_line

            lines.append(f"onnxruntime cannot be imported: {first_line(e)}")
        return "\n".join(lines)
    module = getattr(ort, "__version__", "?")
    if families:
        lines += [f"{dist} {version(dist) or '?'} (module onnxruntime {module})" for dist in families]
    else:
        lines.append(f"onnxruntime {module} (no package metadata)")
    if len(families) > 1:
        lines.append(f"warning: {' and '.join(families)} are both installed and overwrite each other's "
                     "onnxruntime module: uninstall all of them, then install one")
    try:
        providers = ", ".join(ort.get_available_providers())
    except Exception as e:  # pragma: no cover - a broken build
        providers = f"unavailable ({type(e).__name__})"
    lines.append(f"onnxruntime providers: {providers}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (it imports onnxruntime)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashnorm-onnx",
        description="FlashNorm for ONNX: fold each normalization's scale (and LayerNorm bias) into "
        "the linear layers it feeds, so the norm becomes weightless; verify the result in ONNX Runtime.",
        epilog=EPILOG_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of flashnorm-onnx, onnx, onnx-ir and onnxruntime, and "
                        "ONNX Runtime's providers, then exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from flashnorm_onnx.cli import export, inspect, optimize, profile

    for command in (optimize, inspect, profile, export):  # each subcommand's module adds its parser
        command.register(sub)
    for p in {id(p): p for p in sub.choices.values()}.values():
        # `flashnorm-onnx optimize m.onnx --debug` as well as `flashnorm-onnx --debug optimize m.onnx`;
        # SUPPRESS: when not given after the command, the one before it (or False) stands
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show tracebacks and debug logging (also accepted before the command)")
    return parser


def _ort_missing(e: BaseException | None) -> bool:
    """Whether ``e`` comes from ``import onnxruntime`` failing (no ONNX Runtime family installed),
    directly or as the cause of the error raised in its place."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            return True
        seen.add(id(e))
        # the context too, even under `raise ... from None` (the subgraph check raises its one-line
        # error that way): a missing onnxruntime is the cause whatever error was raised in its place
        e = e.__cause__ or e.__context__
    return False


class Stopped(BaseException):
    """SIGTERM arrived (``timeout``, ``docker stop``, ``kill``). A BaseException, like
    KeyboardInterrupt: the ``except BaseException`` paths of the run remove what it staged, and no
    ``except Exception`` takes it for an error of the run."""

    exit_code = 128 + signal.SIGTERM


_stopping = False
"""A :class:`Stopped` is on its way up (a second SIGTERM does not interrupt its cleanup)."""
_received = False
"""SIGTERM arrived during this run: whatever the run ends with, it exits as stopped (the signal
handler runs at whatever bytecode comes next, which may be inside a callback that ONNX Runtime
turns into an error of its own)."""


def _raise_stopped() -> None:
    global _stopping
    _stopping = True
    raise Stopped()


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001
    global _received
    _received = True
    if _stopping:  # a second SIGTERM: the first one's cleanup is under way, let it finish
        return
    # the publisher publishes nothing more, and a commit making its files visible now finishes
    # first (never a data file without its model); loaded before any commit, so no import here
    publish = sys.modules.get("flashnorm_onnx.io.publish")
    if publish is not None and publish.request_stop(_raise_stopped):
        return
    _raise_stopped()


def _trip_sigterm() -> None:
    import _thread
    import time

    time.sleep(0.02)
    _thread.interrupt_main(signal.SIGTERM)  # the main thread's handler, at its next bytecode


def _unraisable(hook):
    """A :class:`Stopped` raised while Python ran a weakref callback or a ``__del__`` (the signal
    handler runs at whatever bytecode comes next) is dropped there: raise the signal again, so the
    stop lands in the run's own code (even if it is lost again, no commit publishes after it);
    anything else goes to ``hook``."""
    def handle(unraisable) -> None:  # noqa: ANN001
        global _stopping
        if isinstance(unraisable.exc_value, Stopped):
            _stopping = False
            # tripped again from another thread, once this hook has returned: raise_signal, os.kill
            # or interrupt_main from here would run the handler inside this hook, and lose it again
            threading.Thread(target=_trip_sigterm, name="flashnorm-stop", daemon=True).start()
            return
        hook(unraisable)

    return handle


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM raises :class:`Stopped` during the run (then the default again). Only from the main
    thread, and only where SIGTERM has its default action (a caller's own handler, or an ignored
    SIGTERM, is left alone)."""
    global _stopping, _received
    _stopping = _received = False
    installed = False
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
                installed = True
        except (ValueError, OSError):  # pragma: no cover - no signals here
            pass
    hook = sys.unraisablehook
    if installed:
        sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            sys.unraisablehook = hook
            publish = sys.modules.get("flashnorm_onnx.io.publish")
            if publish is not None:
                publish.request_stop(None)


def _published_count() -> int:
    publish = sys.modules.get("flashnorm_onnx.io.publish")
    return publish.published_count if publish is not None else 0


def main(argv: list[str] | None = None) -> int:
    with _stop_on_sigterm():
        published = _published_count()
        try:
            code = _main(argv)
        except Stopped:
            code = None
        if not _received:
            return code
        # stopped by SIGTERM: one line, exit 143, whatever error the stop caused on its way
        done = _published_count() - published
        if done:
            what = f" after {done} model file(s) had been published"
        else:
            what = "; nothing written" if _command(argv) == "optimize" else ""
        print(f"flashnorm-onnx: stopped by SIGTERM{what}", file=sys.stderr)
        return Stopped.exit_code


def _command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentTypeError as e:  # pragma: no cover - argparse reports most itself
        parser.error(str(e))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        # numpy's RuntimeWarnings (inf/nan in a weight) would break the one-line error contract;
        # the report and the verification say what matters. --debug shows them.
        warnings.simplefilter("ignore", RuntimeWarning)
    if args.command is None:
        parser.print_help()
        return 2
    handler = args.handler
    try:
        try:
            return int(handler(args) or 0)
        except Exception as e:
            if _ort_missing(e):  # one line naming what to install, exit 7, from every command
                raise ProviderUnavailable(ORT_MISSING) from e
            raise
    except argparse.ArgumentTypeError as e:
        print(f"flashnorm-onnx: error: {e}", file=sys.stderr)
        return 2
    except FlashNormError as e:
        if _received:  # the stop's doing (main says so, in one line)
            raise Stopped() from e
        if args.debug:
            raise
        print(f"flashnorm-onnx: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("flashnorm-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, unless --debug
        if _received:
            raise Stopped() from e
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"flashnorm-onnx: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


