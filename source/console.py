"""Console streams that outlive their reader.

``train.py ... | head`` or a ``tee`` that is closed used to kill a run mid-iteration with a BrokenPipeError
(no snapshot written since the last interval). Everything a run prints is also in its files (log.jsonl, metrics,
status), so once the reader of stdout or stderr has gone, the stream is pointed at /dev/null and the work goes on.
"""
import os
import sys


class _ReaderMayLeave:
    """A text stream whose first BrokenPipeError redirects its file descriptor to /dev/null: that write, the data
    still buffered and every later one are dropped instead of raising."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_readers_leaving() -> None:
    """Wrap sys.stdout and sys.stderr (once) so that a closed pipe silences them instead of ending the process."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ReaderMayLeave) and _has_descriptor(stream):
            setattr(sys, name, _ReaderMayLeave(stream))


def _has_descriptor(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):  # pytest's capture, io.StringIO: nothing to redirect
        return False
