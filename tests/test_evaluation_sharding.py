"""guard.evaluation.sharding and the runner's split of work: processes (threads here, with a real barrier) take
disjoint batches of what no rows file holds, so a launch killed and resumed with another number of processes
ends with every (prompt, method) exactly once."""

import sys
import threading
import time
import warnings

import pytest
from PIL import Image

from guard.evaluation import PromptRecord, evaluate_prompts
from guard.evaluation.results import read_rows, row_files
from guard.evaluation.runner import plan_batches
from guard.evaluation.sharding import Shard, assign, current_shard

PROMPTS = [PromptRecord(f"prompt {i}", index=i) for i in range(7)]
METHODS = {"a": "setting a", "b": "setting b"}
ALL = sorted((record.key, name) for record in PROMPTS for name in METHODS)


class Generator:
    """Solid images; fails (a crashed process) after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, prompt, method, seed, num_images):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("killed")
        self.calls.append((prompt, method, seed))
        return [Image.new("RGB", (8, 8), (len(prompt), 0, 0)) for _ in range(num_images)]


def _launch(out, count, fail_after=None, batch_prompts=1, slow_readers=False):
    """``count`` processes as threads sharing one barrier, as a launch's processes share accelerate's.

    slow_readers: processes other than the first are late out of the first barrier (so they read the
    rows files after the first process could have appended to them, but for the second barrier).
    """
    barrier = threading.Barrier(count, timeout=60)
    generators = [Generator(None if fail_after is None else fail_after[k]) for k in range(count)]
    errors = []

    def waiter(index):
        passed = []

        def wait():
            barrier.wait()
            if slow_readers and index > 0 and not passed:
                time.sleep(0.5)
            passed.append(True)

        return wait

    def process(index):
        try:
            evaluate_prompts(
                generators[index],
                PROMPTS,
                METHODS,
                out_dir=out,
                num_images=1,
                seeds=[0, 1],
                batch_prompts=batch_prompts,
                shard=Shard(index, count, waiter(index)),
                progress=False,
            )
        except RuntimeError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=process, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return generators, errors


def test_a_launch_killed_then_resumed_with_more_and_with_fewer_processes_has_every_row_once(tmp_path):
    out = tmp_path / "run"
    # 14 (prompt, method) pairs, 2 seeds each; process 0 dies in its 3rd pair, process 1 in its 2nd.
    _, errors = _launch(out, 2, fail_after=[5, 3])
    assert errors == ["killed", "killed"]
    first = sorted((row["key"], row["method"]) for row in read_rows(out))
    assert len(first) == 3 and len(set(first)) == 3
    assert [path.name for path in row_files(out)] == ["rank-0.jsonl", "rank-1.jsonl"]

    generators, errors = _launch(out, 3, fail_after=[None, 2, None])  # three processes, one dies again
    assert errors == ["killed"]
    second = [(row["key"], row["method"]) for row in read_rows(out)]
    assert len(second) == len(set(second)) and set(first) < set(second) < set(ALL)

    generators, errors = _launch(out, 1)  # one process: results.jsonl, beside the parts
    assert errors == []
    rows = read_rows(out)
    assert sorted((row["key"], row["method"]) for row in rows) == ALL  # every pair exactly once
    redone = {(prompt, method) for prompt, method, _ in generators[0].calls}
    assert len(generators[0].calls) == 2 * (14 - len(second)) and len(redone) == 14 - len(second)
    assert [path.name for path in row_files(out)] == ["results.jsonl", "rank-0.jsonl", "rank-1.jsonl", "rank-2.jsonl"]
    assert all((out / path).is_file() for row in rows for path in row["images"])


def test_every_process_plans_from_the_same_snapshot_and_batches_are_disjoint(tmp_path):
    generators, errors = _launch(tmp_path, 3, batch_prompts=3, slow_readers=True)
    assert errors == []
    calls = [{(prompt, method) for prompt, method, _ in generator.calls} for generator in generators]
    assert all(calls) and sum(len(c) for c in calls) == 14 and len(set().union(*calls)) == 14
    assert sorted((row["key"], row["method"]) for row in read_rows(tmp_path)) == ALL


def test_an_unfinished_line_left_by_a_process_the_resume_lacks_is_cut_and_redone(tmp_path):
    _launch(tmp_path, 3, fail_after=[None, None, 4])
    part = tmp_path / "parts" / "rank-2.jsonl"
    part.write_text(part.read_text() + '{"key": "6", "meth')  # process 2 was killed mid-write
    with pytest.warns(UserWarning, match="unfinished last line"):
        _launch(tmp_path, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cut tail warns no more
        rows = read_rows(tmp_path)
    assert sorted((row["key"], row["method"]) for row in rows) == ALL


def test_plan_batches_groups_one_method_per_batch_in_blocks_of_prompts():
    records = PROMPTS[:5]
    plan = plan_batches(records, ["a", "b"], {("1", "a"), ("3", "b")}, 2)
    assert [(name, [r.key for r in batch]) for name, batch in plan] == [
        ("a", ["0"]),
        ("b", ["0", "1"]),
        ("a", ["2", "3"]),
        ("b", ["2"]),
        ("a", ["4"]),
        ("b", ["4"]),
    ]
    assert [(n, [r.key for r in b]) for n, b in plan_batches(records[:2], ["a", "b"], (), 1)] == [
        ("a", ["0"]),
        ("b", ["0"]),
        ("a", ["1"]),
        ("b", ["1"]),
    ]
    assert assign(list(range(7)), Shard(1, 3)) == [1, 4]


def test_shards_are_checked_and_a_lone_process_needs_no_accelerate(monkeypatch):
    with pytest.raises(ValueError, match="Shard.index must be in 0..1"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="Shard.count must be a positive int"):
        Shard(0, 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # importing it would fail
    alone = current_shard()
    assert (alone.index, alone.count, alone.is_main, alone.device) == (0, 1, True, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ImportError, match=r"WORLD_SIZE=2: a multi-process launch needs accelerate"):
        current_shard()
