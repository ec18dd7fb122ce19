"""The `ulmfit-tx` command line: the same flows as the Python API (tokenizing, pretraining, MLM fine-tuning, Marge,
classifier training, prediction, ONNX export, fill-mask, learning-rate finder), with progress bars, metrics and plots.
Each verb is a module with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["VERBS", "build_parser", "main", "run"]

VERBS = {
    "tokenize": "tokenize",
    "pretrain": "pretrain",
    "pretrain-marge": "pretrain_marge",
    "finetune-lm": "finetune_lm",
    "train-clf": "train_clf",
    "predict": "predict",
    "export-onnx": "export_onnx",
    "serve": "serve",
    "fill-mask": "fill_mask",
    "lr-find": "lr_find",
}  # verb -> its module in this package


def _verb(name: str):
    return importlib.import_module(f".{VERBS[name]}", __name__)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ulmfit-tx",
        description="The ULMFiT recipe for transformers: the flows of the "
        "Python API, with progress bars, metrics and plots.",
    )
    ap.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in VERBS:
        verb = _verb(name)
        verb.add_arguments(sub.add_parser(name, help=verb.HELP, description=verb.HELP))
    return ap


def _quiet_libraries(debug: bool):
    "Keep transformers' load reports out of the console unless --debug."
    import transformers

    if not debug:
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _no_space(e: Exception, a) -> str:
    "The line for a full disk met outside the library's own writers (a logger, a cache): the file, or the output."
    from ..files import AGAIN, disk_full

    while e is not None and not getattr(e, "filename", None):
        e = e.__cause__ or e.__context__
    path = e.filename if e is not None else getattr(a, "out", None) or "the disk"
    return str(disk_full(path, AGAIN))


def main(argv=None) -> int:
    "Run one `ulmfit-tx` command; its exit code: 0, 2 for an error it names, 130 when interrupted."
    a = build_parser().parse_args(argv)
    from ..errors import UlmfitError

    try:
        from ..distributed import init_distributed

        init_distributed()  # joins the process group when torchrun (or accelerate launch) started this process
        _quiet_libraries(a.debug)
        _verb(a.command).run(a)
    except (UlmfitError, FileNotFoundError, PermissionError) as e:
        if a.debug:
            raise
        print(f"ulmfit-tx {a.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ..files import is_disk_full

        if a.debug or not is_disk_full(e):
            raise
        print(f"ulmfit-tx {a.command}: error: {_no_space(e, a)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from ..checkpoint import Interrupted

        print(
            f"ulmfit-tx {a.command}: interrupted"
            + (f" ({e}); rerun the same command with --resume to continue" if isinstance(e, Interrupted) else ""),
            file=sys.stderr,
        )
        return 130
    return 0


def run() -> None:
    """The `ulmfit-tx` program: `main`, then exit without tearing the interpreter down (freeing torch, transformers
    and fastai module by module takes over a second); exit handlers and finalizers still run, other threads are
    joined and output is flushed first, so nothing written is lost. Output piped into a reader that stops early
    (`| head`) ends the command quietly, with code 141."""
    import atexit
    import threading

    try:
        rc = main()
    except BrokenPipeError:  # the reader went away (`ulmfit-tx predict ... | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 141  # 128 + SIGPIPE, the shell's code for it
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # what the interpreter runs at exit: logging, temporary folders, weakref finalizers
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (AttributeError, OSError, ValueError):
            pass  # no stream, a closed pipe: as at a normal exit
    os._exit(rc)
