"""Fuzzing the safetensors reader that loading and converting share (weights.CheckpointReader).

Random and mutated headers (offsets, dtypes, shapes, lengths, duplicate names, metadata, JSON oddities) and
byte-level mutations of valid files must give an Idefics3Error that names the file, or exactly the tensors
safetensors' own parser reads — never another exception, a hang, or more traced memory than the file's size
allows (`MEMORY_FACTOR` × file + `MEMORY_SLACK`, measured with tracemalloc, which sees numpy's buffers). Valid files
must always load, with the tensors they were written with. A sharded checkpoint's index (its weight map mutated)
must load exactly when it maps each tensor of the shards it names to the file name of the shard holding it.
"""
import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import strategies as st
from mindspore.common.np_dtype import bfloat16
from safetensors import safe_open
from safetensors.numpy import save, save_file

from fuzzing import BUDGETS, run_cases
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.weights import OTHER_SAFETENSORS_DTYPES, SAFE_INDEX, CheckpointReader

NP_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": bfloat16}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
MEMORY_FACTOR, MEMORY_SLACK = 4, 1 << 20

names = st.text(min_size=1, max_size=10).filter(lambda n: n != "__metadata__")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)
big_ints = st.sampled_from([2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 7, 10**30, -1])


@st.composite
def tensors(draw, max_count=4):
    """name → array: the valid dtypes, shapes with zeros and scalars, values with NaN/inf bit patterns."""
    out = {}
    for name in draw(st.lists(names, max_size=max_count, unique=True)):
        dtype = draw(st.sampled_from(sorted(NP_TYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        raw = draw(st.binary(min_size=ITEMSIZE[dtype] * int(np.prod(shape)),
                             max_size=ITEMSIZE[dtype] * int(np.prod(shape))))
        out[name] = np.frombuffer(raw, NP_TYPES[dtype]).reshape(shape)
    return out


def serialize(pairs) -> bytes:
    """A JSON object from (key, value) pairs; keys may repeat (json.dumps cannot write that)."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


@st.composite
def mutated_headers(draw):
    """A consistent header + data, then a few mutations of fields, names, lengths or the JSON text itself."""
    arrays = draw(tensors())
    pairs, offset = [], 0
    for name, array in arrays.items():
        dtype = {np.dtype(v): k for k, v in NP_TYPES.items()}[array.dtype]
        pairs.append((name, {"dtype": dtype, "shape": list(array.shape),
                             "data_offsets": [offset, offset + array.nbytes]}))
        offset += array.nbytes
    if draw(st.booleans()):
        metadata = json_values | st.dictionaries(st.text(max_size=4), st.text(max_size=4))
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", draw(metadata)))
    for _ in range(draw(st.integers(0, 3))):
        if not pairs:
            break
        i = draw(st.integers(0, len(pairs) - 1))
        name, entry = pairs[i]
        entry = dict(entry) if isinstance(entry, dict) else {}
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        kind = draw(st.sampled_from(["field", "drop", "extra", "duplicate", "entry", "order"]))
        if kind == "field":
            entry[key] = draw(st.one_of(
                json_values, st.sampled_from(list(NP_TYPES) + list(OTHER_SAFETENSORS_DTYPES) + ["f32", ""]),
                st.lists(st.integers(-3, 40) | big_ints, max_size=4)))
        elif kind == "drop":
            entry.pop(key, None)
        elif kind == "extra":
            entry[draw(st.text(max_size=5))] = draw(json_values)
        elif kind == "entry":
            entry = draw(json_values)
        if kind == "duplicate":
            pairs.append((name, entry))
        elif kind == "order":
            pairs = draw(st.permutations(pairs))
        else:
            pairs[i] = (name, entry)
    header = serialize(pairs)
    header = draw(st.one_of(
        st.just(header), st.integers(0, 9).map(lambda n: header + b" " * n),
        st.binary(min_size=1, max_size=4).map(lambda b: header + b), st.binary(max_size=40),
        st.just(header.replace(b'"', b"'", 1)),
        st.integers(1, 30_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting (the limit: 1000 or 10000)
        st.integers(1, 9000).map(lambda n: b'{"a": ' + b"9" * n + b"}")))  # a huge number
    length = draw(st.one_of(st.just(len(header)), st.integers(-9, 9).map(lambda d: max(len(header) + d, 0)),
                            st.integers(0, 2**64 - 1)))
    size = max(offset + draw(st.integers(-8, 8) if draw(st.booleans()) else st.just(0)), 0)
    return length.to_bytes(8, "little") + header + draw(st.binary(min_size=size, max_size=size))


@st.composite
def mutated_files(draw):
    """A file written by safetensors itself, then bit flips, truncation, overwrites, insertions and edited numbers."""
    data = bytearray(save(draw(tensors()), metadata=draw(st.none() | st.just({"format": "pt"}))))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(0, 4))):  # 0: the file as written (it must read)
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert", "number", "length"]))
        end = max(min(len(data), draw(st.sampled_from([len(data), header_end]))) - 1, 0)  # often in the header
        where = draw(st.integers(0, end))
        if kind == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[where:]
        elif kind == "overwrite":
            data[where:where + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "number":  # another value for one number of the header (a dim or an offset)
            text = bytes(data[8:header_end])
            digits = [i for i in range(len(text)) if text[i:i + 1].isdigit() and not text[i - 1:i].isdigit()]
            if digits:
                at = 8 + draw(st.sampled_from(digits))
                stop = at
                while stop < len(data) and data[stop:stop + 1].isdigit():
                    stop += 1
                data[at:stop] = str(draw(st.integers(0, 64) | big_ints.filter(lambda v: v >= 0))).encode()
        else:
            data[0:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(data)


class Reading:
    """Reads fuzzed files as `model.safetensors` of one directory, tracing memory."""

    def __init__(self, directory):
        self.directory, self.path = directory, directory / "model.safetensors"
        self.outcomes = {"error": 0, "read": 0}

    def check(self, data: bytes, expected=None) -> None:
        """An Idefics3Error naming the file, or the tensors safetensors reads (`expected` ones, if given)."""
        self.path.write_bytes(data)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            reader = CheckpointReader(self.directory)
            try:
                got = {name: (info, reader.get(name), reader.read_elements(name, 0, info.numel))
                       for name, info in reader.tensors.items()}
            finally:
                reader.close()
        except Idefics3Error as e:
            assert str(self.path) in str(e) and "\n" not in str(e), str(e)
            assert expected is None, f"a valid file was refused: {e}"
            got = None
        peak = tracemalloc.get_traced_memory()[1] - before
        assert peak <= MEMORY_FACTOR * len(data) + MEMORY_SLACK, f"{peak} bytes traced for a {len(data)}-byte file"
        self.outcomes["error" if got is None else "read"] += 1
        if got is not None:
            with safe_open(str(self.path), framework="np") as f:
                truth = expected or {name: f.get_tensor(name) for name in f.keys()}
            assert sorted(got) == sorted(truth)
            for name, (info, array, flat) in got.items():
                want = truth[name]
                assert info.shape == want.shape and array.shape == want.shape and array.dtype == want.dtype
                assert want.tobytes() == array.tobytes() == flat.tobytes()


@pytest.fixture
def reading(tmp_path):
    tracemalloc.start()
    try:
        yield Reading(tmp_path)
    finally:
        tracemalloc.stop()


@BUDGETS
def test_fuzzed_headers_give_a_clear_error_or_the_right_tensors(reading, budget):
    run_cases(mutated_headers(), reading.check, budget)
    assert reading.outcomes["error"] and reading.outcomes["read"], reading.outcomes


@BUDGETS
def test_mutated_files_give_a_clear_error_or_the_right_tensors(reading, budget):
    run_cases(mutated_files(), reading.check, budget)
    assert reading.outcomes["error"] and reading.outcomes["read"], reading.outcomes


@BUDGETS
def test_valid_files_always_load_with_their_tensors(reading, budget):
    def check(case):
        arrays, metadata = case
        reading.check(save(arrays, metadata=metadata), expected=arrays)

    run_cases(st.tuples(tensors(max_count=6), st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                          min_size=1)),
              check, budget)


SHARDS = {"model-00001-of-00002.safetensors": {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.float16)},
          "model-00002-of-00002.safetensors": {"c": np.zeros(3, np.float32)}}
TRUE_MAP = {name: file for file, tensors in SHARDS.items() for name in tensors}


@st.composite
def indexes(draw):
    """The index JSON text of SHARDS: its weight map mutated (values, keys, types), or the whole file."""
    weight_map = dict(TRUE_MAP)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(TRUE_MAP) + ["d", "a/b"]))
        weight_map[name] = draw(st.sampled_from(sorted(SHARDS) + [
            "missing.safetensors", "../model-00001-of-00002.safetensors", "/etc/hostname", "", ".", "sub/x"])
            | json_values)
        if draw(st.booleans()):
            weight_map.pop(draw(st.sampled_from(sorted(weight_map))), None)
    index = {"metadata": {"total_size": 28}, "weight_map": weight_map}
    return draw(st.sampled_from([json.dumps(index), json.dumps({"weight_map": draw(json_values)}),
                                 json.dumps(draw(json_values)), "{not json", json.dumps(index)[:20]]))


@pytest.fixture
def sharded(tmp_path):
    for file, tensors in SHARDS.items():
        save_file(tensors, str(tmp_path / file))
    return tmp_path


@BUDGETS
def test_fuzzed_shard_indexes_load_exactly_when_they_match_the_shards(sharded, budget):
    index = sharded / SAFE_INDEX

    def check(text):
        index.write_text(text)
        try:  # valid: every shard it names is one of SHARDS and has exactly its tensors mapped to it
            weight_map = json.loads(text)["weight_map"]
            listed = set(weight_map.values())
            valid = bool(listed) and listed <= set(SHARDS) and weight_map == {
                name: file for file in listed for name in SHARDS[file]}
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        try:
            reader = CheckpointReader(sharded)
        except Idefics3Error as e:
            assert not valid, f"a valid index was refused: {e}"
            assert "\n" not in str(e) and (SAFE_INDEX in str(e) or ".safetensors" in str(e)), str(e)
            return
        assert valid, "an index that does not match the shards was accepted"
        assert {name: info.file.name for name, info in reader.tensors.items()} == weight_map  # unlisted: ignored
        reader.close()

    run_cases(indexes(), check, budget)
