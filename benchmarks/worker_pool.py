"""Run a benchmark's runs in this process or each in a fresh process, a few at a time (the benchmarks' worker pool).

Each run is ``run(spec) -> dict`` on a picklable spec; a run in a fresh process has its own peak memory. The
processes are forked from a fork server that has imported torch, Lightning, transformers, peft and lit_mofo once
(and run nothing: no thread pools to inherit), so a run starts in a fraction of a second instead of the 10-30 s a
spawned interpreter takes to import them. Results come back through pipes (no queue, no semaphore to leak); on an
error, Ctrl+C or SIGTERM (which the benchmarks turn into ``SystemExit``) the running processes are killed and joined.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

__all__ = ["PRELOAD", "exit_on_signal", "run_all"]

PRELOAD = ["torch", "lightning.pytorch", "transformers", "peft", "lit_mofo"]
_SIGNALLED: list[int] = []


def exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """The benchmarks' SIGTERM handler: unwind like Ctrl+C, with ``SystemExit(128 + signum)``.

    When it arrives while multiprocessing runs a finaliser (closing a finished run's pipes), an exception raised
    there would be swallowed ("Exception ignored in: <Finalize object>") and the remaining runs would go on: the
    signal is remembered instead, and the pool stops at its next turn."""
    _SIGNALLED.append(signum)
    while frame is not None:
        if frame.f_code is multiprocessing.util.Finalize.__call__.__code__:
            return
        frame = frame.f_back
    raise SystemExit(128 + signum)


def _stop_if_signalled() -> None:
    if _SIGNALLED:
        raise SystemExit(128 + _SIGNALLED[0])


def run_all(
    specs: Sequence[Any],
    workers: int,
    run: Callable[[Any], dict[str, Any]],
    done: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """``run`` every spec, in this process (``workers=0``; ``peak_rss_mib`` is then None, shared with every other
    run) or each in a fresh process, ``workers`` at a time; ``done(result)`` as each finishes. Returns the results in
    the order they finished. ``run`` must be a module-level function (a worker imports it)."""
    results: list[dict[str, Any]] = []

    def finished(result: dict[str, Any]) -> None:
        results.append(result)
        done(result)

    if workers == 0:
        for spec in specs:
            _stop_if_signalled()
            result = run(spec)
            result["peak_rss_mib"] = None  # shared with every other run of this process: not attributable
            finished(result)
        return results
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    pending = list(specs)
    running: dict[Any, tuple[Any, Any]] = {}  # result pipe -> (process, spec)
    try:
        while pending or running:
            _stop_if_signalled()
            while pending and len(running) < workers:
                spec = pending.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_run_in_child, args=(run, spec, sender), daemon=True)
                process.start()
                sender.close()
                running[receiver] = (process, spec)
            for receiver in multiprocessing.connection.wait(list(running)):
                process, spec = running.pop(receiver)
                try:
                    error, result = receiver.recv()
                except EOFError:
                    error, result = "the process ended without a result", None
                receiver.close()
                process.join()
                if error is not None:
                    raise RuntimeError(f"{spec} failed (exit code {process.exitcode}):\n{error}")
                finished(result)
                _stop_if_signalled()
    finally:
        for process, _ in running.values():
            process.kill()  # not terminate(): Lightning's SIGTERM handler would finish the step and report back
        for process, _ in running.values():
            process.join()
    return results


def _run_in_child(run: Callable[[Any], dict[str, Any]], spec: Any, connection: Any) -> None:
    """``run(spec)`` in a worker process: ``(None, result)`` or ``(traceback, None)`` through ``connection``."""
    try:
        try:
            outcome: tuple[str | None, dict[str, Any] | None] = (None, run(spec))
        except BaseException:
            outcome = (traceback.format_exc(), None)
        connection.send(outcome)
    except BrokenPipeError:  # the parent has stopped waiting (it was interrupted): nobody to report to
        pass
    finally:
        connection.close()
