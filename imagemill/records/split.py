"""The JSON path split over processes: one process scores about 20,000 records a second (parsing
and serialising JSON hold the GIL), so a large input is cut into parts (a JSONL file into byte
ranges on line boundaries, a PostgreSQL store into key ranges of one snapshot), each retagged by a
process of its own into a file of its own, and the parts' files are then added to the output in
order: the output is the one process's, byte for byte.

The processes are forked once the text tower is loaded and the vocabulary embedded (seconds, and
the model's memory shared with them, never loaded again); each scores with one torch thread, the
parts being the parallelism.
"""

import multiprocessing
import queue
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from imagemill.core.errors import UserError
from imagemill.core.sinks.files import JsonlSink
from imagemill.records.retagger import RetagCounts, Retagger

Batches = Iterable[list[dict[str, Any]]]
# one part's work: its batches retagged into its sink, `advance` told of each batch read
Stream = Callable[[Batches, JsonlSink, Retagger, Callable[[int], None]], None]

# inputs smaller than these are retagged in one process: forking and joining the parts costs a
# fraction of a second, and a small run is simpler to follow
SPLIT_BYTES = 32 << 20  # of a JSONL file (about 10,000 records with 512-d embeddings)
SPLIT_ROWS = 10_000  # of a PostgreSQL store
POLL_S = 0.5  # how often the parent looks for a part's process that ended without a word


def retag_parts(
    sources: Sequence[Callable[[], Batches]],
    sink: JsonlSink,
    retagger: Retagger,
    stream: Stream,
    advance: Callable[[int], None],
) -> None:
    """Each source's batches retagged by `stream` in a forked process of its own into a part file
    beside the sink's, then the parts added to `sink` in the sources' order and what each retagged
    merged into `retagger`'s counts. The first part to fail stops the others, and its error is
    raised here. `retagger` must have its text tower loaded (`Retagger.load_for`)."""
    context = multiprocessing.get_context("fork")  # the loaded model shared, not pickled nor loaded again
    messages: multiprocessing.Queue[tuple[int, str, Any]] = context.Queue()
    paths = [sink.partial.with_name(f"{sink.partial.name}.{index}") for index in range(len(sources))]
    processes = [
        context.Process(
            target=_part,
            args=(index, source, paths[index], retagger, stream, messages),
            name=f"imagemill-retag-{index}",
            daemon=True,  # never outlives the command
        )
        for index, source in enumerate(sources)
    ]
    results: dict[int, tuple[RetagCounts, dict[Any, Any]]] = {}
    try:
        for process in processes:
            process.start()
        while len(results) < len(processes):
            try:
                index, what, value = messages.get(timeout=POLL_S)
            except queue.Empty:
                _check_alive(processes, results, messages)
                continue
            if what == "read":
                advance(value)
            elif what == "failed":
                raise _raised(*value)
            else:
                results[index] = value
        for process in processes:
            process.join()
        for index, path in enumerate(paths):
            retagger.merge(*results[index])
            sink.append(path)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            if process.pid is not None:
                process.join()
        messages.close()
        for path in paths:  # a part and, of a process stopped half-way, what it was writing
            path.unlink(missing_ok=True)
            path.with_name(f".{path.name}.partial").unlink(missing_ok=True)


def _check_alive(
    processes: list[Any], results: dict[int, Any], messages: "multiprocessing.Queue[tuple[int, str, Any]]"
) -> None:
    """A part's process that ended without saying so (killed: out of memory, a signal) stops the run."""
    for index, process in enumerate(processes):
        if index not in results and process.exitcode is not None and messages.empty():
            raise RuntimeError(f"retag: the process of part {index} ended with exit code {process.exitcode}")


def _part(
    index: int,
    source: Callable[[], Batches],
    path: Path,
    retagger: Retagger,
    stream: Stream,
    messages: "multiprocessing.Queue[tuple[int, str, Any]]",
) -> None:
    """One part, in its own process: its batches retagged into `path`, then its counts sent back."""
    import torch  # loaded in the parent already

    torch.set_num_threads(1)  # a core each: the parts are the parallelism
    retagger.counts = RetagCounts()
    part = JsonlSink(path, keep_existing=False)
    try:
        stream(source(), part, retagger, lambda count: messages.put((index, "read", count)))
        part.close()
        messages.put((index, "done", (retagger.counts, retagger.known_signatures)))
    except BaseException as exc:  # noqa: BLE001 -- sent to the parent, which raises it
        part.abort().unlink(missing_ok=True)
        messages.put((index, "failed", _sendable(exc)))


def _sendable(exc: BaseException) -> tuple[str, str]:
    """A part's error as its kind and text (plain strings, whatever the exception holds): the parent
    raises the same kind again (`_raised`)."""
    if isinstance(exc, UserError):
        return "user", str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ""
    return "other", f"{type(exc).__name__}: {exc}"


def _raised(kind: str, text: str) -> BaseException:
    """The error `_sendable` sent: a UserError stays one (one line at the CLI), an interrupt stays one."""
    if kind == "user":
        return UserError(text)
    if kind == "interrupted":
        return KeyboardInterrupt()
    return RuntimeError(f"retag: {text}")
