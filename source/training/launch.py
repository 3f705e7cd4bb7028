"""torchrun, with a stop by Ctrl-C (or SIGTERM), and a worker's failure, reported in one line instead of torchrun's
traceback.

    python -m source.training.launch --nproc_per_node 4 train.py --config configs/sr_imagenet.yaml ...

Takes exactly torchrun's arguments. On Ctrl-C torchrun forwards the signal to every worker; the
workers finish their iteration, write a snapshot and rank 0 prints the resume command. torchrun then
re-raises the signal as a SignalException (a traceback and exit status 1); here it becomes one line and
the shell's usual 128 + signal status. torchrun SIGKILLs workers that take longer than
``--shutdown-timeout`` (default 30 s) to stop, so give more when an iteration and a snapshot take longer.
A worker that fails (train.py's one-line error above, exit status 2 for bad input) ends the launch with its
status, as train.py alone would.
"""
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main() -> int:
    try:
        torchrun()
    except SignalException as stop:
        print(f"launch: {stop.sigval.name} received: the workers stopped; rank 0's last lines above say where "
              "its snapshot is and how to resume", file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        print(f"launch: worker {rank} failed with exit status {failure.exitcode}; its message is above",
              file=sys.stderr)
        return failure.exitcode if 0 < failure.exitcode < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
