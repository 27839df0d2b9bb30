"""core/a1111_text.py: the WebUI's PNG-info ``parameters`` text, written and read back, and its short hashes."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from histo_assets.core.a1111_text import (
    LEGACY_HYPERNET_KEYS,
    SAMPLER_NAMES,
    SHORT_HASH_LENGTH,
    WEBUI_SAMPLERS,
    a1111_parameters,
    hypernetwork_token,
    parse_a1111_parameters,
    short_hash,
)
from histo_assets.core.io import sha256_file
from histo_assets_tests.conftest import thesis_generation
from histo_assets_tests.webui_rules import hypernet_tokens, webui_paste

MODEL_HASH = "6ce0161689"
MODEL = "v1-5-pruned-emaonly"

# Prompts and negative prompts with every character that could break the layout (§8b).
AWKWARD_PROMPTS = [
    ("an H&E tile, eosin: pink, haematoxylin: blue", "grainy, blurry"),
    ('a "quoted" tile, (detail:1.2)', 'text: "watermark", logo'),
    ("first line,\nsecond line: more", "bad,\nworse: still"),
    ("Steps: 1, Sampler: fake, Seed: 9", "Size: 1x1, Model: fake, RNG: GPU"),
    ("é, ü: ß — tissue", "ñ, ø"),
]


# --- short hashes ------------------------------------------------------------------------------------


def test_model_hash_of_a_multi_megabyte_file_is_the_first_ten_hex_digits_of_its_sha256(tmp_path):
    """§8b: ``Model hash`` is the first 10 hex digits of the checkpoint file's SHA-256."""
    data = np.random.default_rng(0).integers(0, 256, size=3 * (1 << 20) + 12345, dtype=np.uint8).tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full
    assert SHORT_HASH_LENGTH == 10
    assert short_hash(full) == full[:10]
    assert re.fullmatch(r"[0-9a-f]{10}", short_hash(sha256_file(path)))
    text = a1111_parameters("a tile", "", thesis_generation(), 1, short_hash(sha256_file(path)), "model")
    assert parse_a1111_parameters(text)["Model hash"] == full[:10]
    assert webui_paste(text)["Model hash"] == full[:10]


def test_different_files_get_different_short_hashes(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"hypernetwork a")
    second.write_bytes(b"hypernetwork b")
    hashes = [short_hash(sha256_file(path)) for path in (first, second)]
    assert hashes == [hashlib.sha256(b"hypernetwork a").hexdigest()[:10],
                      hashlib.sha256(b"hypernetwork b").hexdigest()[:10]]
    assert hashes[0] != hashes[1]


# --- writing, then reading back as we and the WebUI do -----------------------------------------------


@pytest.mark.parametrize(("prompt", "negative"), AWKWARD_PROMPTS)
def test_prompts_with_commas_quotes_colons_and_newlines_read_back_whole_by_us_and_the_webui(prompt, negative):
    text = a1111_parameters(prompt, negative, thesis_generation(), 42, MODEL_HASH, MODEL)
    parsed = parse_a1111_parameters(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == (prompt, negative)
    assert (parsed["Seed"], parsed["Model"], parsed["Model hash"]) == ("42", MODEL, MODEL_HASH)
    pasted = webui_paste(text)
    assert (pasted["Prompt"], pasted["Negative prompt"]) == (prompt, negative)
    assert {key: pasted[key] for key in parsed} == parsed, "the WebUI's reader fills in the same fields"


@pytest.mark.parametrize("name", ["lab, v2", "model: final", 'the "best" one', "two\nlines", "back\\slash, too",
                                  "ünïcode: ok"])
def test_values_with_commas_colons_quotes_or_newlines_are_json_quoted_and_read_back(name):
    text = a1111_parameters("a tile", "", thesis_generation(), 7, MODEL_HASH, name)
    last_line = text.split("\n")[-1]
    assert f"Model: {json.dumps(name, ensure_ascii=False)}, RNG: CPU" in last_line
    assert len(text.split("\n")) == 2, "a quoted newline stays on the parameters line"
    assert parse_a1111_parameters(text)["Model"] == name
    assert webui_paste(text)["Model"] == name


def test_plain_values_are_written_unquoted():
    text = a1111_parameters("a tile", "", thesis_generation(), 7, MODEL_HASH, "v1-5 pruned emaonly")
    assert text.split("\n")[-1].endswith("Model: v1-5 pruned emaonly, RNG: CPU")
    assert '"' not in text


def test_the_text_written_for_every_sampler_parses_back_to_every_field_in_the_webui_order():
    for key, sampler in WEBUI_SAMPLERS.items():
        settings = thesis_generation(sampler=key, steps=37, cfg_scale=12.25, width=512, height=768)
        text = a1111_parameters("a tile", "blurry", settings, 4294967295, MODEL_HASH, MODEL)
        parsed = parse_a1111_parameters(text)
        schedule = [("Schedule type", sampler.schedule_type)] if sampler.schedule_type else []
        assert list(parsed.items()) == [
            ("Prompt", "a tile"), ("Negative prompt", "blurry"), ("Steps", "37"), ("Sampler", SAMPLER_NAMES[key]),
            *schedule, ("CFG scale", "12.25"), ("Seed", "4294967295"), ("Size", "512x768"),
            ("Model hash", MODEL_HASH), ("Model", MODEL), ("RNG", "CPU"),
        ], key


def test_schedule_type_is_written_only_where_our_schedule_is_not_the_webui_default():
    """§8b: newer WebUIs write ``Schedule type`` only off the default; for DPM++ 2M "Automatic" means Karras."""
    written = {key: sampler.schedule_type for key, sampler in WEBUI_SAMPLERS.items()}
    assert written == {"euler": None, "euler_a": None, "ddim": None, "dpm++_2m": "Uniform", "lms": None}
    for key in WEBUI_SAMPLERS:
        pasted = webui_paste(a1111_parameters("a tile", "", thesis_generation(sampler=key), 1, MODEL_HASH, MODEL))
        assert pasted["Schedule type"] == ("Uniform" if key == "dpm++_2m" else "Automatic"), key
        assert pasted["RNG"] == "CPU", "a paste draws the noise on the CPU, as we did"


def test_whole_cfg_scales_are_written_without_a_decimal_point():
    scales = {}
    for cfg in (1.0, 7, 7.5, 12.25):
        text = a1111_parameters("a tile", "", thesis_generation(cfg_scale=cfg), 1, MODEL_HASH, MODEL)
        scales[cfg] = parse_a1111_parameters(text)["CFG scale"]
    assert scales == {1.0: "1", 7: "7", 7.5: "7.5", 12.25: "12.25"}


# --- hypernetworks -----------------------------------------------------------------------------------


def test_the_hypernetwork_token_writes_its_multiplier_as_a_float():
    assert hypernetwork_token("fibrocystic-5000", 1) == "<hypernet:fibrocystic-5000:1.0>"
    assert hypernetwork_token("lab net", 0.5) == "<hypernet:lab net:0.5>"
    assert hypernet_tokens(hypernetwork_token("x-1", 0.25)) == [("x-1", "0.25")]


def test_a_paste_activates_the_hypernetwork_once_at_the_settings_multiplier():
    """§8b: the token is the only mention; no legacy ``Hypernet`` keys, which would add a second token."""
    text = a1111_parameters("a tile, eosin", "blurry", thesis_generation(multiplier=0.75), 3, MODEL_HASH, MODEL,
                            "fibrocystic-5000")
    assert text.split("\n")[0] == "a tile, eosin <hypernet:fibrocystic-5000:0.75>"
    parsed = parse_a1111_parameters(text)
    assert not set(LEGACY_HYPERNET_KEYS) & set(parsed)
    assert parsed["Prompt"] == "a tile, eosin <hypernet:fibrocystic-5000:0.75>"
    pasted = webui_paste(text)
    assert hypernet_tokens(pasted["Prompt"]) == [("fibrocystic-5000", "0.75")]
    assert hypernet_tokens(pasted["Negative prompt"]) == []


def test_an_empty_prompt_with_a_hypernetwork_is_the_token_alone():
    text = a1111_parameters("", "", thesis_generation(), 3, MODEL_HASH, MODEL, "hn")
    assert text.split("\n")[0] == "<hypernet:hn:1.0>"
    assert "Negative prompt:" not in text
    assert parse_a1111_parameters(text)["Prompt"] == webui_paste(text)["Prompt"] == "<hypernet:hn:1.0>"


def test_an_empty_prompt_without_a_hypernetwork_still_reads_back_as_empty():
    text = a1111_parameters("", "", thesis_generation(), 3, MODEL_HASH, MODEL)
    parsed = parse_a1111_parameters(text)
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Seed"]) == ("", "", "3")
    assert webui_paste(text)["Prompt"] == ""


# --- reading texts we did not write ------------------------------------------------------------------


def test_legacy_hypernet_keys_of_older_images_are_read_as_written():
    text = ("a tile\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 512x512, "
            "Model hash: 6ce0161689, Model: sd, Hypernet: fibrocystic-5000, Hypernet hash: 0123456789, "
            "Hypernet strength: 0.8")
    parsed = parse_a1111_parameters(text)
    assert [parsed[key] for key in LEGACY_HYPERNET_KEYS] == ["fibrocystic-5000", "0123456789", "0.8"]
    assert parsed["Prompt"] == "a tile" and parsed["Negative prompt"] == "blurry"
    assert "RNG" not in parsed, "no RNG key is read as no RNG key: lineage sees what the image says"


def test_a_last_line_with_fewer_than_three_pairs_belongs_to_the_prompt():
    text = "a tile\nstyle: oil, mood: calm"
    assert parse_a1111_parameters(text) == {"Prompt": text, "Negative prompt": ""}
    assert webui_paste(text)["Prompt"] == text


def test_a_trailing_newline_does_not_change_what_is_read():
    text = a1111_parameters("a tile", "blurry", thesis_generation(), 8, MODEL_HASH, "lab, v2")
    assert parse_a1111_parameters(text + "\n") == parse_a1111_parameters(text)


def test_an_escaped_quote_inside_a_quoted_value_does_not_end_it():
    text = 'a tile\nSteps: 20, Sampler: Euler, Model: "say \\"a, b\\": c", Seed: 1'
    parsed = parse_a1111_parameters(text)
    assert parsed["Model"] == 'say "a, b": c'
    assert parsed["Seed"] == "1"
