"""params.yaml: one schema, errors that name the key and the allowed values."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import ParamsError, load_params, validate_params

ROOT = Path(__file__).resolve().parents[2]


def _error(raw) -> str:
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    return str(e.value)


def test_the_committed_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert abs(sum(p.data.mixture.as_dict().values()) - 1) < 1e-9


def test_unknown_key_names_it_and_lists_allowed_keys():
    msg = _error({"corpus": {"synthetic": {"n_captions": 10}}})
    assert "corpus.synthetic.n_captions" in msg
    assert "n_caption" in msg and "n_interleaved" in msg and "max_objects" in msg
    assert "'seed'" not in _error({"sed": 1}) and "seed, corpus" in _error({"sed": 1})


def test_wrong_type_names_the_key():
    msg = _error({"data": {"context_length": "256"}})
    assert "data.context_length" in msg and "valid integer" in msg


def test_negative_size_names_the_key_and_bound():
    msg = _error({"corpus": {"synthetic": {"n_caption": -1}}, "shards": {"patch_size": 0}})
    assert "corpus.synthetic.n_caption" in msg and "greater than or equal to 0" in msg
    assert "shards.patch_size" in msg  # every problem is reported at once


def test_mixture_must_sum_to_one():
    msg = _error({"data": {"mixture": {"caption": 0.5, "interleaved": 0.5, "text": 0.1}}})
    assert "data.mixture" in msg and "sum to 1" in msg and "caption, interleaved, text" in msg
    msg = _error({"data": {"mixture": {"caption": 0.5, "interleaved": 0.5, "audio": 0.0}}})
    assert "data.mixture.audio" in msg


def test_literal_lists_allowed_values():
    msg = _error({"corpus": {"source": "web"}})
    assert "corpus.source" in msg and "'synthetic'" in msg and "'files'" in msg
    msg = _error({"corpus": {"synthetic": {"shapes": ["circle", "hexagon"]}}})
    assert "corpus.synthetic.shapes.1" in msg and "'triangle'" in msg


def test_cross_field_checks():
    assert "patch_size" in _error({"shards": {"image_size": 30, "patch_size": 8}})
    assert "data.context_length" in _error({"data": {"context_length": 10}})
    assert "max_objects" in _error({"corpus": {"synthetic": {"grid": 2, "max_objects": 4}}})
    assert "corpus.files" in _error({"corpus": {"source": "files"}})


def test_cli_fails_before_any_work(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"corpus": {"synthetic": {"n_text": -3}}}))
    for module in ("stages.params", "stages.corpus"):
        args = [str(bad)] if module == "stages.params" else ["--params", str(bad)]
        r = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True
        )
        assert r.returncode != 0
        assert "corpus.synthetic.n_text" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was written
