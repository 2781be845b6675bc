"""The pieces under idefics3-batch, without a model: rows, records on disk, collate, batching, records of answers,
ranks."""
import json
import os

import numpy as np
import pytest

from batch_workspace import make_workspace, write_jsonl
from mindone_idefics3.batch.prepare import PreparedRow
from mindone_idefics3.batch.records import RecordWriter, read_records, write_atomically
from mindone_idefics3.batch.rows import InputRow, read_rows
from mindone_idefics3.batch.runner import answer_record, length_batches, windows
from mindone_idefics3.batch.shards import OutputFiles
from mindone_idefics3.distributed import World, current_world, share_cpu_threads
from mindone_idefics3.errors import Idefics3Error


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("parts"))


def test_rows_resolve_images_next_to_the_input_and_wrap_prompts(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [
        {"id": 7, "prompt": "Q?",
         "images": ["sub/a.png", "/abs/b.png", "https://x.org/c.jpg", "data:image/png;base64,AA"]},
        {"id": "7", "messages": [{"role": "user", "content": "hi"}]}])
    (tmp_path / "in.jsonl").write_text((tmp_path / "in.jsonl").read_text() + "\n   \n")  # blank lines are skipped
    first, second = read_rows(tmp_path / "in.jsonl")
    assert first.images == [str(tmp_path / "sub/a.png"), "/abs/b.png", "https://x.org/c.jpg",
                            "data:image/png;base64,AA"]
    assert first.messages == [{"role": "user", "content": [{"type": "image"}] * 4 + [{"type": "text", "text": "Q?"}]}]
    assert (first.index, first.line, second.index, second.line) == (0, 1, 1, 2)
    assert first.key != second.key  # 7 and "7" are different ids


def test_records_drop_a_torn_last_line_and_the_writer_cuts_it_off(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text('{"id": 1, "answer": "a"}\n{"id": 2, "ans')
    assert read_records(path) == [{"id": 1, "answer": "a"}]
    writer = RecordWriter(path)
    writer.write([{"id": 2, "answer": "b"}])
    writer.close()
    assert path.read_text() == '{"id": 1, "answer": "a"}\n{"id": 2, "answer": "b"}\n'
    assert read_records(tmp_path / "absent.jsonl") == []


def test_a_foreign_line_in_the_middle_is_an_error_with_its_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1}\nhello\n{"id": 2}\n')
    with pytest.raises(Idefics3Error, match=r"out.jsonl:2: not a JSON record"):
        read_records(path)
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(Idefics3Error, match=r"out.jsonl:2: a record must be a JSON object with an \"id\""):
        read_records(path)


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    write_atomically(path, [{"id": 1, "answer": "é"}])
    assert path.read_text(encoding="utf-8") == '{"id": 1, "answer": "é"}\n'

    def failing():
        yield {"id": 2}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(path, failing())
    assert path.read_text(encoding="utf-8") == '{"id": 1, "answer": "é"}\n'  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_collect_reads_the_final_file_and_every_part(tmp_path):
    files = OutputFiles(tmp_path / "out.jsonl")
    write_jsonl(files.final, [{"id": 1, "answer": "a"}])
    files.parts_dir.mkdir()
    write_jsonl(files.part(0), [{"id": 2, "answer": "b"}])
    write_jsonl(files.part(3), [{"id": "3", "error": "x"}])  # a part of an earlier run with more ranks
    assert sorted(files.collect()) == sorted([json.dumps(1), json.dumps(2), json.dumps("3")])


def test_collate_equals_the_processor_on_the_whole_batch(workspace):
    from mindone_idefics3 import Idefics3Processor
    from mindone_idefics3.processing import load_image
    from mindone_idefics3.processing.collate import collate

    processor = Idefics3Processor.from_pretrained(workspace / "model")
    samples = [("<image>What is it?", ["img.png"]), ("Text only, a longer prompt than the others.", []),
               ("<image><image>Compare.", ["wide.png", "tall.png"])]
    prompts = [text for text, _ in samples]
    images = [[load_image(workspace / name) for name in names] for _, names in samples]
    whole = processor(text=prompts, images=images, padding=True, padding_side="left")
    alone = [processor(text=text, images=[imgs] if imgs else None) for text, imgs in zip(prompts, images)]
    together = collate(alone, processor.tokenizer.pad_token_id)
    assert set(together) == set(whole) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
    for key in whole:
        np.testing.assert_array_equal(together[key], whole[key], err_msg=key)
        assert together[key].dtype == whole[key].dtype


def test_collate_needs_a_pad_token_only_to_pad():
    from mindone_idefics3.processing.collate import collate

    sample = {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[1, 1]])}
    assert collate([sample, sample], None)["input_ids"].tolist() == [[1, 2], [1, 2]]
    short = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}
    with pytest.raises(Idefics3Error, match="needs a pad token"):
        collate([sample, short], None)


def prepared(index: int, length: int) -> PreparedRow:
    row = InputRow(index, index + 1, f"r{index}", [])
    return PreparedRow(row, {"input_ids": np.zeros((1, length), np.int64)})


def test_batches_hold_similar_lengths_longest_first():
    rows = [prepared(i, n) for i, n in enumerate([5, 90, 7, 88, 6, 91, 60])]
    batches = length_batches(rows, 3)
    assert [[p.prompt_tokens for p in b] for b in batches] == [[91, 90, 88], [60, 7, 6], [5]]
    assert [len(w) for w in windows(list(range(10)), 4)] == [4, 4, 2]


def test_answer_record_ends_at_the_first_stop_token(workspace):
    from mindone_idefics3 import Idefics3Processor

    processor = Idefics3Processor.from_pretrained(workspace / "model")
    eou = processor.end_of_utterance_token_id
    hello = processor.tokenizer.encode("The quick brown fox", add_special_tokens=False)
    row = prepared(0, 20)
    stopped = answer_record(row, np.array(hello + [eou]), "stop", processor)
    assert stopped == {"id": "r0", "answer": "The quick brown fox", "prompt_tokens": 20,
                       "completion_tokens": len(hello) + 1, "finish_reason": "stop"}
    ran_out = answer_record(row, np.array(hello), "length", processor)
    assert ran_out["finish_reason"] == "length" and ran_out["completion_tokens"] == len(hello)


def test_ranks_come_from_msrun_and_share_the_cpu(monkeypatch):
    monkeypatch.delenv("RANK_ID", raising=False)
    monkeypatch.delenv("RANK_SIZE", raising=False)
    assert current_world() == World(0, 1)
    monkeypatch.setenv("RANK_ID", "1")
    monkeypatch.setenv("RANK_SIZE", "3")
    world = current_world()
    rows = [InputRow(i, i + 1, i, []) for i in range(7)]
    assert [r.index for r in rows if world.owns(r)] == [1, 4]
    monkeypatch.setenv("MINDONE_CPU_THREADS", "")  # restored to its value (or absence) after the test
    monkeypatch.delenv("MINDONE_CPU_THREADS")
    share_cpu_threads(world)
    assert os.environ["MINDONE_CPU_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 3))
    monkeypatch.setenv("RANK_ID", "3")
    with pytest.raises(Idefics3Error, match="RANK_ID='3' / RANK_SIZE='3'"):
        current_world()


def test_rank_zero_stops_waiting_for_a_rank_that_died(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from mindone_idefics3.batch.shards import RankDied, dead_ranks, wait_for_all_rows

    files = OutputFiles(tmp_path / "out.jsonl")
    files.parts_dir.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    def pid_file(rank, pid, ppid):
        (files.parts_dir / f"rank-{rank}.pid").write_text(
            json.dumps({"pid": pid, "ppid": ppid, "host": socket.gethostname()}))

    pid_file(1, gone.pid, os.getppid())  # same launch, exited
    pid_file(2, os.getpid(), os.getppid())  # same launch, running
    pid_file(3, gone.pid, os.getppid() + 1)  # a pid file left by an earlier launch: not this run's rank
    assert dead_ranks(files, [1, 2, 3, 4]) == [1]
    rows = [InputRow(i, i + 1, i, []) for i in range(4)]
    write_jsonl(files.part(0), [{"id": 0, "answer": "a"}])
    with pytest.raises(RankDied, match=r"rank\(s\) \[1\] ended before writing their records"):
        wait_for_all_rows(files, rows, World(0, 4), poll_seconds=0.01)


def test_an_output_is_finished_only_with_exactly_the_input_rows_and_no_parts(tmp_path):
    from mindone_idefics3.batch.shards import finished

    files = OutputFiles(tmp_path / "out.jsonl")
    rows = [InputRow(i, i + 1, i, []) for i in range(3)]
    assert not finished(files, rows)
    write_jsonl(files.final, [{"id": i, "answer": "x"} for i in range(3)])
    assert finished(files, rows)
    assert not finished(files, rows[:2])  # rows were removed from the input: the output is rewritten
    assert not finished(files, rows + [InputRow(3, 4, 3, [])])
    files.parts_dir.mkdir()
    assert not finished(files, rows)  # records wait to be merged


def test_msruns_scheduler_process_runs_no_rows(monkeypatch, tmp_path):
    from mindone_idefics3.batch.cli import main

    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    monkeypatch.setenv("RANK_ID", "0")
    monkeypatch.setenv("RANK_SIZE", "2")
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    assert main(["--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "in.jsonl"]
