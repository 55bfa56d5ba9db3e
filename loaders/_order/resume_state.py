"""A StreamingDataset's resume state: its errors, and every field checked before the state is believed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trainio.storage import TrainioError

from .partitions import PartitionError, node_partitions

STATE_FORMAT = "trainio.streaming"
STATE_VERSION = 1

HOW_TO_KNOW = ("pass state_dict(consumed=steps * global_batch) (the samples the trainer consumed, all ranks "
               "together), or iterate through torchdata's StatefulDataLoader or trainio's Loader, which keep the "
               "position themselves")


class ResumeMismatch(TrainioError, ValueError):
    """A saved position belongs to another dataset, seed or configuration, or is not a valid position at all.

    The message names each field that differs or is wrong, in one line, also
    when a DataLoader worker refused the state (torch re-raises a worker's
    error in the main process with the worker's traceback as its message).
    """

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


_FROM_WORKER = re.compile(r"Caught ResumeMismatch (in DataLoader worker process \d+)\.\nOriginal Traceback")


def _one_line(message: str) -> str:
    """``message``, or, if it is torch's re-raise of a worker's ResumeMismatch, the worker's own message."""
    worker = _FROM_WORKER.match(message)
    if worker is None:
        return message
    last = [line for line in message.splitlines() if "ResumeMismatch: " in line][-1]
    return f"{last.split('ResumeMismatch: ', 1)[1]} (refused {worker.group(1)}, before it read any sample)"


class PositionUnknown(TrainioError, RuntimeError):
    """:meth:`StreamingDataset.state_dict` cannot know the position: another process iterated the dataset.

    Raised in the main process of a DataLoader with workers, whose copy of
    the dataset never iterates; the message says what to do instead.
    """


def _fail(field: str, value: object, must: str) -> ResumeMismatch:
    return ResumeMismatch(f"cannot resume: the state's {field} is {value!r}: {must}")


def _integer(state: Mapping[str, Any], field: str, low: int, high: int | None, what: str) -> int:
    value = state.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise _fail(field, value, f"must be an integer {bound} ({what})")
    return value


def check_state(state: object, epoch_samples: int) -> Mapping[str, Any]:
    """``state`` if it is well-formed: a mapping of the right format, every field of the right type and range.

    What it belongs to (seed, datasets, configuration) is compared by the
    caller; here ``consumed`` must lie within the ``epoch_samples`` of an
    epoch, and a per-worker part must be a worker of a valid layout.

    Raises:
        ResumeMismatch: naming the first field that is wrong.
    """
    if not isinstance(state, Mapping):
        raise ResumeMismatch(f"cannot resume from a {type(state).__name__}: a StreamingDataset state is the dict "
                             "its state_dict() returned")
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ResumeMismatch(f"not a StreamingDataset state of version {STATE_VERSION}: "
                             f"{state.get('format')!r} v{state.get('version')!r}")
    _integer(state, "epoch", 0, None, "epochs count from 0")
    _integer(state, "consumed", 0, epoch_samples, f"samples of the epoch's {epoch_samples} consumed")
    if "partitions" in state:
        partitions = _integer(state, "partitions", 1, None, "partitions of the epoch's order")
        if partitions > 1 and _integer(state, "global_batch", 1, None, "samples per step") % partitions:
            raise _fail("global_batch", state["global_batch"], f"must be a multiple of the {partitions} partitions")
    datasets = state.get("datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, Mapping) for d in datasets):
        raise _fail("datasets", datasets, "must be a list of {url, index_xxh3, weight} objects")
    worker = state.get("worker")
    if worker is not None:
        if not isinstance(worker, Mapping):
            raise _fail("worker", worker, "must be an object {id, workers, yielded}")
        workers = _integer(worker, "workers", 1, None, "DataLoader workers")
        _integer(worker, "id", 0, workers - 1, f"a worker of {workers}")
        _integer(worker, "yielded", 0, epoch_samples, "samples this worker delivered")
    return state


def check_partitions(state: Mapping[str, Any], nodes: int, global_batch: int, epoch_samples: int) -> int:
    """The partitions a checked ``state``'s epoch is cut into (1 if it does not say), if ``nodes`` can go on reading it.

    Raises:
        ResumeMismatch: ``nodes`` does not divide them (naming the node
            counts that do), the state's global batch is not
            ``global_batch``, or it stands between two steps.
    """
    partitions = int(state.get("partitions", 1))
    if partitions == 1:
        return 1
    if state["global_batch"] != global_batch:
        raise ResumeMismatch(f"cannot resume: the state's epoch is cut into {partitions} partitions for a global "
                             f"batch of {state['global_batch']} samples, and this job's is {global_batch} (ranks x "
                             "batch_size): resume with the same global batch, or from the start of an epoch")
    consumed, size = state["consumed"], epoch_samples
    if consumed % global_batch and consumed != size:
        raise ResumeMismatch(f"cannot resume: the state's consumed is {consumed}, not a whole number of global batches "
                             f"of {global_batch}: an epoch cut into partitions resumes at a step boundary (pass "
                             "state_dict(consumed=steps * global_batch))")
    try:
        node_partitions(partitions, nodes, 0)
    except PartitionError as exc:
        raise ResumeMismatch(f"cannot resume: {exc}") from None
    return partitions


def check_worker_yielded(worker: Mapping[str, Any], share: int) -> int:
    """The ``yielded`` of a per-worker state, if within ``share``, the samples of the epoch that worker reads."""
    yielded = int(worker["yielded"])
    if yielded > share:
        raise _fail("worker.yielded", yielded, f"must be at most {share}, the samples this worker reads this epoch")
    return yielded


def state_differences(state: Mapping[str, Any], mine: Mapping[str, Any]) -> list[str]:
    """What differs between a checked ``state`` and this dataset's own (``mine``), one phrase per field."""
    differences = [f"{key}: saved {state.get(key)!r}, now {mine[key]!r}"
                   for key in ("seed", "shuffle", "shuffle_window", "epoch_size") if state.get(key) != mine[key]]
    saved = state["datasets"]
    if len(saved) != len(mine["datasets"]):
        differences.append(f"datasets: saved {len(saved)}, now {len(mine['datasets'])}")
    for i, (old, new) in enumerate(zip(saved, mine["datasets"])):
        if old.get("index_xxh3") != new["index_xxh3"]:
            differences.append(f"dataset {i} ({new['url']}): index.json changed "
                               f"(saved xxh3 {old.get('index_xxh3')}, now {new['index_xxh3']})")
        if old.get("weight") != new["weight"]:
            differences.append(f"dataset {i}: weight saved {old.get('weight')}, now {new['weight']}")
    return differences
