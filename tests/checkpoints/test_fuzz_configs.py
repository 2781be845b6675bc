"""Fuzzing `config.json` (config.Idefics3Config) and `preprocessor_config.json` (ImageProcessorConfig).

Fields of a valid config are deleted, or set to values of every JSON type, in and out of range. A small
specification here (independent of the code under test) says which results are valid: a valid one must load with
the values given (or the default of a deleted field), an invalid one must be one Idefics3Error whose message names
the field at fault (or one of the fields of a violated relation, e.g. hidden_size and num_attention_heads). The
files themselves are also damaged (missing, truncated, not UTF-8, nested or numbers too deep for Python's json):
an error must then name the file.
"""
import copy
import json
import math
import shutil

import pytest
from hypothesis import strategies as st

from fuzzing import BUDGETS, run_cases
from mindone_idefics3.config import Idefics3Config, TextConfig, VisionConfig
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.processing import Idefics3Processor
from mindone_idefics3.processing.image import ImageProcessorConfig

DELETE = object()  # the mutation that removes a field

CONFIG = {  # SmolVLM-256M-like, with Llama 3.1's rope scaling
    "model_type": "idefics3", "scale_factor": 4, "image_token_id": 49190, "pad_token_id": 128002,
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 512, "patch_size": 16,
                      "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "model_type": "idefics3_vision"},
    "text_config": {"model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
                    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000,
                    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
                    "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": [2, 49279],
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
PREPROCESSOR = {
    "image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": True,
    "size": {"longest_edge": 2048}, "resample": 1, "do_image_splitting": True, "max_image_size": {"longest_edge": 512},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "do_pad": True,
}

values = st.one_of(
    st.just(DELETE), st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**31, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-6, 2.5, 8.0]),
    st.text(max_size=4), st.sampled_from(["silu", "llama", "llama3", "linear", "default", "gelu_new", "idefics3"]),
    st.lists(st.integers(-1, 5) | st.floats(0, 2) | st.text(max_size=2), max_size=4),
    st.dictionaries(st.sampled_from(["longest_edge", "height", "rope_type", "x"]), st.integers(-1, 600), max_size=2))


# ----------------------------------------------------------------------------------------------- the specification
def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v):
    return number(v) and isinstance(v, int) and 0 < v < 2**31


def positive_number(v):
    return number(v) and 0 < v < math.inf


def three_numbers(v, nonzero=False):
    v = [v] * 3 if number(v) else v
    return isinstance(v, list) and len(v) == 3 and all(number(x) and math.isfinite(x) and not (nonzero and x == 0)
                                                       for x in v)


def token_id(v):
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def one_of(*choices):
    return lambda v: isinstance(v, str) and v in choices


FIELDS = {  # section → field → (valid?, default when deleted or DELETE if required)
    "vision_config": {
        **{n: (positive_int, VisionConfig.HF_DEFAULTS[n]) for n in ("hidden_size", "intermediate_size",
                                                                  "num_hidden_layers", "num_attention_heads",
                                                                  "image_size", "patch_size")},
        "num_channels": (lambda v: positive_int(v) and v == 3, 3),
        "layer_norm_eps": (positive_number, 1e-6),
        "hidden_act": (one_of("gelu_pytorch_tanh", "gelu_new", "gelu_fast"), "gelu_pytorch_tanh"),
    },
    "text_config": {
        **{n: (positive_int, TextConfig.HF_DEFAULTS[n]) for n in ("vocab_size", "hidden_size", "intermediate_size",
                                                                "num_hidden_layers", "num_attention_heads",
                                                                "max_position_embeddings")},
        "num_key_value_heads": (lambda v: v is None or positive_int(v), None),
        "head_dim": (lambda v: v is None or positive_int(v), None),
        "rms_norm_eps": (positive_number, 1e-6), "rope_theta": (positive_number, 10000.0),
        **{n: (lambda v: isinstance(v, bool), False) for n in ("tie_word_embeddings", "attention_bias", "mlp_bias")},
        "hidden_act": (one_of("silu"), "silu"), "model_type": (one_of("llama"), "llama"),
        "pad_token_id": (token_id, None), "bos_token_id": (token_id, 1),
        "eos_token_id": (lambda v: token_id(v) or (isinstance(v, list) and all(token_id(i) and i is not None
                                                                               for i in v)), 2),
    },
    "rope_scaling": {
        "rope_type": (one_of("default", "linear", "llama3"), "default"),
        "factor": (positive_number, 1.0), "low_freq_factor": (positive_number, 1.0),
        "high_freq_factor": (positive_number, 4.0), "original_max_position_embeddings": (positive_int, 8192),
    },
    "config": {
        "model_type": (one_of("idefics3"), DELETE), "scale_factor": (positive_int, 2),
        "image_token_id": (lambda v: token_id(v) and v is not None and v >= 0, 128257),
        "pad_token_id": (token_id, 128002),
    },
}
LLAMA3_NEEDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def config_problems(config) -> list:
    """Each problem of a config.json dict as the set of field names an error for it may name ([] = valid)."""
    problems, sections = [], {"config": config}
    for name, when_missing in (("vision_config", {}), ("text_config", DELETE)):
        section = config.get(name, when_missing)
        section = {} if section is None and name == "vision_config" else section
        if isinstance(section, dict):
            sections[name] = section
        else:
            problems.append({name})
    rope = sections.get("text_config", {}).get("rope_scaling")
    if isinstance(rope, dict):
        sections["rope_scaling"] = rope
    elif rope is not None:
        problems.append({"rope_scaling"})
    value, bad = {}, set()
    for section, fields in FIELDS.items():
        if section not in sections and section != "rope_scaling":  # not an object: reported above
            bad.update((section, name) for name in fields)
            continue
        given = sections.get(section, {})
        for name, (valid, default) in fields.items():
            v = given[name] if name in given else default
            if section == "rope_scaling" and name == "rope_type" and name not in given:
                v = given.get("type", "default")
            if section == "rope_scaling" and name in LLAMA3_NEEDS and name not in given and \
                    value.get(("rope_scaling", "rope_type")) == "llama3":
                bad.add((section, name))
            elif v is DELETE or not valid(v):
                bad.add((section, name))
            value[section, name] = v
    problems += [{name} for _, name in sorted(bad)]

    def relation(holds, fields, names):
        """A relation between valid fields (section, name); its error may name any of `names`."""
        if not set(fields) & bad and not holds(*(value[f] for f in fields)):
            problems.append(set(names))

    vision = [("vision_config", n) for n in ("hidden_size", "num_attention_heads", "image_size", "patch_size")]
    text = [("text_config", n) for n in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "vocab_size")]
    relation(lambda h, n, *_: h % n == 0, vision, {"hidden_size", "num_attention_heads"})
    relation(lambda h, n, size, patch: size % patch == 0, vision, {"image_size", "patch_size"})
    relation(lambda h, n, kv, *_: n % (kv or n) == 0, text, {"num_attention_heads", "num_key_value_heads"})
    relation(lambda h, n, kv, d, _: (d or h // n) > 0 and (d or h // n) % 2 == 0, text,
             {"head_dim", "hidden_size", "num_attention_heads"})
    relation(lambda h, n, size, patch, s: size // patch % s == 0, vision + [("config", "scale_factor")],
             {"scale_factor"})
    relation(lambda vocab, token: token < vocab, [("text_config", "vocab_size"), ("config", "image_token_id")],
             {"image_token_id"})
    return problems


PREPROCESSOR_FIELDS = {  # field → valid? (null or missing: the default, always valid)
    **{n: lambda v: isinstance(v, bool) for n in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize",
                                                   "do_convert_rgb", "do_pad")},
    "size": lambda v: edge(v, 2**31 - 1), "max_image_size": lambda v: edge(v, 4096),
    "resample": lambda v: positive_int(v + 1) and v <= 5 if number(v) else False,
    "rescale_factor": positive_number, "image_mean": three_numbers,
    "image_std": lambda v: three_numbers(v, nonzero=True),
}


def edge(v, most):
    v = {"longest_edge": v} if number(v) and isinstance(v, int) else v
    return isinstance(v, dict) and positive_int(v.get("longest_edge")) and v["longest_edge"] <= most


def preprocessor_problems(config) -> list:
    return [{name} for name, valid in PREPROCESSOR_FIELDS.items()
            if config.get(name) is not None and not valid(config[name])]


# ----------------------------------------------------------------------------------------------- the fuzzing
@st.composite
def mutations(draw, base, fields):
    """(config, [(section, field)] mutated): 1-3 fields of `base` (or of `fields`: section → names) deleted or set
    to a random value."""
    config = copy.deepcopy(base)
    changed = []
    for _ in range(draw(st.integers(1, 3))):
        sections = {"config": config, **{k: v for k, v in config.items() if isinstance(v, dict) and k in fields}}
        text = config.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("rope_scaling"), dict):
            sections["rope_scaling"] = text["rope_scaling"]
        section = draw(st.sampled_from(sorted(sections)))
        target = sections[section]
        name = draw(st.sampled_from(sorted(set(target) | set(fields.get(section, {})))))
        value = draw(values)
        if value is DELETE:
            target.pop(name, None)
        else:
            target[name] = value
        changed.append((section, name))
    return config, changed


def assert_names_a_problem(error: Idefics3Error, problems) -> None:
    message = str(error)
    assert "\n" not in message
    assert any(any(name in message for name in names) for names in problems), (message, problems)


def loaded_as_specified(load, config, problems):
    """`load(config)` (as read back from JSON) if `problems` is empty, else None after an Idefics3Error that names
    one of them."""
    try:
        loaded = load(json.loads(json.dumps(config)))
    except Idefics3Error as e:
        assert problems, f"a valid config was refused: {e}"
        assert_names_a_problem(e, problems)
        return None
    assert not problems, f"an invalid config was accepted: {problems}"
    return loaded


def check_config(case) -> None:
    config, _ = case
    loaded = loaded_as_specified(Idefics3Config.from_dict, config, config_problems(config))
    if loaded is None:
        return
    for section, name in case[1]:
        where = {"config": loaded, "vision_config": loaded.vision_config, "text_config": loaded.text_config,
                 "rope_scaling": loaded.text_config.rope_scaling}.get(section)
        given = {"config": config, "vision_config": config.get("vision_config"),
                 "text_config": config["text_config"], "rope_scaling": config["text_config"].get("rope_scaling")}
        if name in FIELDS[section] and hasattr(where, name) and isinstance(given[section], dict) and \
                name in given[section] and given[section][name] is not None:
            got, want = getattr(where, name), given[section][name]
            assert got == (float(want) if isinstance(got, float) else want), (section, name)  # numbers as floats


def check_preprocessor(case) -> None:
    config, changed = case
    loaded = loaded_as_specified(ImageProcessorConfig.from_dict, config, preprocessor_problems(config))
    if loaded is None:
        return
    for _, name in changed:
        if name in ("do_resize", "do_image_splitting", "resample", "rescale_factor") and config.get(name) is not None:
            assert getattr(loaded, name) == config[name]


@BUDGETS
def test_fuzzed_config_json_loads_exactly_when_valid_and_names_the_bad_field(budget):
    run_cases(mutations(CONFIG, FIELDS), check_config, budget)


@BUDGETS
def test_fuzzed_preprocessor_config_loads_exactly_when_valid_and_names_the_bad_field(budget):
    run_cases(mutations(PREPROCESSOR, {"config": PREPROCESSOR_FIELDS}), check_preprocessor, budget)


@pytest.mark.parametrize("config", [CONFIG, PREPROCESSOR], ids=["config", "preprocessor"])
def test_the_unmutated_configs_are_valid(config):
    assert not (config_problems(config) if config is CONFIG else preprocessor_problems(config))
    (Idefics3Config if config is CONFIG else ImageProcessorConfig).from_dict(config)


@st.composite
def damaged_files(draw, base):
    """The bytes of `base` as a JSON file, damaged (None: the file is missing)."""
    text = json.dumps(base, indent=1).encode()
    at = draw(st.integers(0, len(text)))
    return draw(st.sampled_from([
        None, b"", text[:at], text[:at] + b"\xff\xfe" + text[at:], text[:at] + b"[" * 20_000 + text[at:],
        text[:at] + b"9" * 5000 + text[at:], b"[" + text + b"]", text.replace(b":", b"=", 1), text]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("files") / "model")


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
@BUDGETS
def test_damaged_config_files_give_an_error_naming_the_file(model_dir, tmp_path, name, budget):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    base = json.loads((directory / name).read_text())
    problems = config_problems if name == "config.json" else preprocessor_problems
    load = (lambda: Idefics3Config.from_json_file(directory / name)) if name == "config.json" else \
        (lambda: Idefics3Processor.from_pretrained(directory))

    def check(data):
        path = directory / name
        path.unlink(missing_ok=True)
        if data is not None:
            path.write_bytes(data)
        try:
            parsed = json.loads(data)
        except (TypeError, ValueError, RecursionError):
            parsed = None
        fields = problems(parsed) if isinstance(parsed, dict) else None
        try:
            load()
        except Idefics3Error as e:
            assert "\n" not in str(e)
            if fields is None:
                assert name in str(e), str(e)
            else:
                assert fields, f"a valid {name} was refused: {e}"
                assert_names_a_problem(e, fields)
            return
        assert fields == [], f"a damaged {name} was accepted"

    run_cases(damaged_files(base), check, budget)
