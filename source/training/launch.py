"""torchrun, with a stop by Ctrl-C (or SIGTERM), and a worker's failure, reported in one line instead of torchrun's
traceback.

    python -m source.training.launch --nproc_per_node 4 train.py --config configs/sr_imagenet.yaml ...

Takes exactly torchrun's arguments. On Ctrl-C torchrun forwards the signal to every worker; the
workers finish their iteration, write a snapshot and rank 0 prints the resume command. torchrun then
re-raises the signal as a SignalException (a traceback and exit status 1); here it becomes one line and
the shell's usual 128 + signal status. torchrun SIGKILLs workers that take longer than
``--shutdown-timeout`` (default 30 s) to stop, so give more when an iteration and a snapshot take longer.
A worker that fails (exit status 2 for bad input) ends the launch with its status, as train.py alone would, and
the launch's last line repeats the message it recorded (``distributed.record_for_launcher``): torchrun stops the
other workers at once, so rank 0, which speaks for all before the process group exists, may not have said it.
"""
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run


def main() -> int:
    try:
        run(parse_args(sys.argv[1:]))  # torchrun's main without its @record, which logs the workers' error files
    except SignalException as stop:
        print(f"launch: {stop.sigval.name} received: the workers stopped; rank 0's last lines above say where "
              "its snapshot is and how to resume", file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, failure = first_failure(failed)
        said = recorded_line(failure)
        print(f"launch: worker {rank} failed with exit status {failure.exitcode}"
              f"{f': {said}' if said else '; its message is above'}", file=sys.stderr)
        return failure.exitcode if 0 < failure.exitcode < 256 else 1
    return 0


def first_failure(failed: ChildFailedError) -> tuple[int, ProcessFailure]:
    """Of the failures that recorded their line, one that exited with its own status (a worker the agent stopped
    may have recorded its line just before: its status is the signal's), the earliest; else torchrun's first
    (whose traceback is above)."""
    said = {rank: failure for rank, failure in failed.failures.items() if recorded_line(failure)}
    if not said:
        return failed.get_first_failure()
    rank = min(said, key=lambda rank: (said[rank].exitcode <= 0, said[rank].timestamp, rank))
    return rank, said[rank]


def recorded_line(failure: ProcessFailure) -> str | None:
    """What the worker recorded (train.py's one-line error), None when it recorded nothing (a crash, a signal)."""
    message = failure.error_file_data.get("message")
    return message.get("message") if isinstance(message, dict) else None


if __name__ == "__main__":
    sys.exit(main())
