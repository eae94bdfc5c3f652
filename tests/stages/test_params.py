"""params.yaml: one schema, errors that name the key and the allowed values, no defaults of
its own (params.yaml lists every key)."""

import subprocess
import sys

import pytest
import yaml

from model.archs import VARIANTS
from model.sizes import SIZES
from stages.common.paths import ROOT
from stages.params import (
    REPO_PARAMS,
    Params,
    ParamsError,
    load_params,
    merge,
    read_yaml,
    study_params,
    validate_params,
)


def _error(raw) -> str:
    """The error of the repository's params.yaml with ``raw`` merged in."""
    with pytest.raises(ParamsError) as e:
        validate_params(merge(read_yaml(REPO_PARAMS), raw))
    return str(e.value)


def test_the_committed_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    for m in p.grid.mixtures.values():
        assert abs(sum(m.as_dict().values()) - 1) < 1e-9


def _sections(model: type) -> list[tuple[str, type]]:
    """Every schema class reachable from ``model``, with its dotted path."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Params.__base__):
            out += [(name, ann)] + [(f"{name}.{k}", t) for k, t in _sections(ann)]
    return out


def test_the_schema_has_no_defaults_of_its_own_and_params_yaml_lists_every_key():
    raw = read_yaml(REPO_PARAMS)
    for path, section in [("", Params), *_sections(Params)]:
        if section.__name__ == "Mixture":  # a kind left out is not sampled: 0, not a default
            continue
        defaults = [k for k, f in section.model_fields.items() if not f.is_required()]
        assert not defaults, f"{section.__name__} has defaults: {defaults}"
        node = raw
        for part in filter(None, path.split(".")):
            node = node[part]
        assert set(node) == set(section.model_fields), path  # every key, no more


def test_a_missing_key_is_named():
    raw = read_yaml(REPO_PARAMS)
    del raw["train"]["lr_ref"]
    with pytest.raises(ParamsError, match=r"missing key 'train\.lr_ref'"):
        validate_params(raw)


def test_allowed_archs_and_sizes_come_from_the_registries_in_model():
    ok = study_params({"grid": {"archs": list(VARIANTS), "sizes": list(SIZES)}})
    assert ok.grid.archs == list(VARIANTS)
    msg = _error({"grid": {"archs": ["early", "mid"], "sizes": ["huge"]}})
    assert "grid.archs.1" in msg and all(f"'{a}'" in msg for a in VARIANTS)
    assert "grid.sizes.0" in msg and all(s in msg for s in SIZES) and "wWIDTHdDEPTH" in msg
    # a size by width and depth; a width that is not a multiple of 16 is refused, named
    assert study_params({"grid": {"sizes": ["w1024d24", "xs"]}}).grid.sizes == ["w1024d24", "xs"]
    assert "multiple of 16" in _error({"grid": {"sizes": ["w1000d24"]}})


def test_unknown_key_names_it_and_lists_allowed_keys():
    msg = _error({"corpus": {"synthetic": {"n_captions": 10}}})
    assert "corpus.synthetic.n_captions" in msg
    assert "n_caption" in msg and "n_interleaved" in msg and "zipf_a" in msg
    assert "'seed'" not in _error({"sed": 1}) and "seed, corpus" in _error({"sed": 1})


def test_wrong_type_names_the_key():
    msg = _error({"data": {"context_length": "256"}})
    assert "data.context_length" in msg and "valid integer" in msg


def test_negative_size_names_the_key_and_bound():
    msg = _error({"corpus": {"synthetic": {"n_caption": -1}}, "shards": {"patch_size": 0}})
    assert "corpus.synthetic.n_caption" in msg and "greater than or equal to 0" in msg
    assert "shards.patch_size" in msg  # every problem is reported at once


def test_mixture_must_sum_to_one():
    bad = {"caption": 0.5, "interleaved": 0.5, "text": 0.1}
    msg = _error({"grid": {"mixtures": {"m": bad}}})
    assert "grid.mixtures.m" in msg and "sum to 1" in msg and "caption, interleaved, text" in msg
    msg = _error({"grid": {"mixtures": {"m": {"caption": 0.5, "interleaved": 0.5, "audio": 0}}}})
    assert "grid.mixtures.m.audio" in msg
    only = study_params({"grid": {"mixtures": {"captions": {"caption": 1.0}}}})
    assert only.grid.mixtures["captions"].as_dict() == {"caption": 1, "interleaved": 0, "text": 0}


def test_literal_lists_allowed_values():
    msg = _error({"corpus": {"source": "web"}})
    assert "corpus.source" in msg and "'synthetic'" in msg and "'files'" in msg
    msg = _error({"tokenizer": {"source": "hub"}})
    assert "tokenizer.source" in msg and "'train'" in msg and "'file'" in msg


def test_bad_world_knobs_name_the_key_and_the_bound():
    bad = {"entity_bits": 30, "zipf_a": 0, "classes": 11, "max_entities": 5, "image_size": 40}
    msg = _error({"corpus": {"synthetic": bad}})
    for key in bad:
        assert f"corpus.synthetic.{key}" in msg, key
    assert "less than or equal to 22" in msg and "multiple of 16" in msg


def test_cross_field_checks():
    assert "patch_size" in _error({"shards": {"image_size": 30, "patch_size": 8}})
    assert "data.context_length" in _error({"data": {"context_length": 10}})
    msg = _error({"corpus": {"synthetic": {"entity_bits": 8, "visual_bits": 12}}})
    assert "visual_bits=12" in msg and "allowed 0..8" in msg
    assert "corpus.files" in _error({"corpus": {"source": "files"}})
    msg = _error({"grid": {"experts": [2, 8]}, "model": {"top_k": 2}})
    assert "grid.experts has 2: with model.top_k=2 every count must be >= 4" in msg
    assert "experts has duplicates" in _error({"grid": {"experts": [4, 4]}})
    assert "grid.experts.0" in _error({"grid": {"experts": [1]}})


def test_cli_fails_before_any_work(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(
        yaml.safe_dump(merge(read_yaml(REPO_PARAMS), {"corpus": {"synthetic": {"n_text": -3}}}))
    )
    for module in ("stages.params", "stages.corpus"):
        args = [str(bad)] if module == "stages.params" else ["--params", str(bad)]
        r = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True
        )
        assert r.returncode != 0
        assert "corpus.synthetic.n_text" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was written


def test_the_five_arch_study_is_the_default_with_two_more_archs():
    """studies/five-arch.yaml decides the two findings the default cannot test: it must stay the
    default study (every other key equal) with discrete and early-moe-aware added."""
    default, five = read_yaml(REPO_PARAMS), read_yaml(ROOT / "studies" / "five-arch.yaml")
    validate_params(five)
    assert set(five["grid"]["archs"]) == set(default["grid"]["archs"]) | {"discrete",
                                                                          "early-moe-aware"}  # fmt: skip
    for raw in (default, five):
        del raw["grid"]["archs"], raw["grid"]["study"]
    assert five == default
