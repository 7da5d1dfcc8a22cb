"""--concepts files and --sweep grids: read in every format, checked with one-line errors before any model loads."""

from __future__ import annotations

import json

import pytest

from utils.concepts import Defaults, expand_sweep, load_concepts, parse_sweep, single_concept
from utils.errors import UserError


@pytest.fixture()
def folders(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    return tmp_path


def _yaml(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_json_csv_read_the_same(folders):
    a, b = folders / "a", folders / "b"
    y = _yaml(folders, f"- name: red-ball\n  train_data_dir: {a}\n  init_text: ball\n  num_vectors: 2\n"
                       f"  template: subject\n  learning_rate: 0.01\n- name: cat\n  data: {b}\n")
    j = _yaml(folders, json.dumps({"concepts": [
        {"name": "red-ball", "train_data_dir": str(a), "initializer_token": "ball", "vectors": 2,
         "template_file": "subject", "lr": "0.01"}, {"name": "cat", "train_data_dir": str(b)}]}), "c.json")
    c = _yaml(folders, f"name,train_data_dir,init_text,num_vectors,template,learning_rate\n"
                       f"red-ball,{a},ball,2,subject,0.01\ncat,{b},,,,\n", "c.csv")
    m = _yaml(folders, f"red-ball: {{train_data_dir: {a}, init_text: ball, num_vectors: 2, template: subject, "
                       f"learning_rate: 0.01}}\ncat: {{train_data_dir: {b}}}\n", "m.yml")
    d = Defaults(initializer_token="*", num_vectors=1, template_file=None, learning_rate="0.005")
    loaded = [load_concepts(p, d) for p in (y, j, c, m)]
    assert all(x == loaded[0] for x in loaded)
    first, second = loaded[0]
    assert (first.name, first.initializer_token, first.num_vectors, first.template_file, first.learning_rate) == \
        ("red-ball", "ball", 2, "subject", "0.01")
    # fields left out take the run's flags
    assert (second.initializer_token, second.num_vectors, second.template_file, second.learning_rate) == \
        ("*", 1, None, "0.005")
    assert first.eval_data_dir is None and second.eval_data_dir is None


def test_each_concept_may_name_its_held_out_pictures_and_its_sweep_variants_keep_them(folders):
    a, b = folders / "a", folders / "b"
    y = _yaml(folders, f"- name: red-ball\n  train_data_dir: {a}\n  eval_data_dir: {b}\n- name: cat\n  data: {b}\n")
    c = _yaml(folders, f"name,train_data_dir,eval_data\nred-ball,{a},{b}\ncat,{b},\n", "c.csv")
    for p in (y, c):
        first, second = load_concepts(p, Defaults())
        assert first.eval_data_dir == str(b) and second.eval_data_dir is None
    variants = expand_sweep(load_concepts(y, Defaults()), parse_sweep("num_vectors=1,2"), Defaults())
    assert [v.eval_data_dir for v in variants] == [str(b), str(b), None, None]
    with pytest.raises(UserError, match=r"entry 1 \('x'\): eval_data_dir /no/such: no such folder"):
        load_concepts(_yaml(folders, f"- name: x\n  train_data_dir: {a}\n  eval_data_dir: /no/such\n", "e.yaml"),
                      Defaults())


@pytest.mark.parametrize("text, message", [
    ("- name: x\n  train_data_dir: {a}\n  lrr: 1\n", "entry 1 ('x'): unknown field 'lrr'"),
    ("- train_data_dir: {a}\n", "entry 1: no name"),
    ("- name: x\n", "entry 1 ('x'): no data"),
    ("- name: x\n  train_data_dir: {a}/missing\n", "no such folder"),
    ("- name: x\n  train_data_dir: {a}\n  num_vectors: 0\n", "num_vectors must be 1..75"),
    ("- name: x\n  train_data_dir: {a}\n  num_vectors: two\n", "num_vectors must be a whole number"),
    ("- name: x\n  train_data_dir: {a}\n  learning_rate: fast\n", "entry 1 ('x'): learning_rate 'fast'"),
    ("- name: x\n  train_data_dir: {a}\n  learning_rate: nan\n", "not a usable rate"),
    ("- name: x\n  train_data_dir: {a}\n  template: nosuch\n", "template file 'nosuch' not found"),
    ("- name: x\n  train_data_dir: {a}\n- name: X\n  train_data_dir: {a}\n", "'X' is used twice (entries 1 and 2)"),
    ("- name: '!!'\n  train_data_dir: {a}\n", "no usable characters"),
    ("[unclosed\n", "cannot parse"),
    ("just text\n", "expected a list of concepts"),
    ("[]\n", "no concepts"),
])
def test_bad_files_give_one_line_errors(folders, text, message):
    p = _yaml(folders, text.format(a=folders / "a"))
    with pytest.raises(UserError) as e:
        load_concepts(p, Defaults())
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"--concepts {p}")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="--concepts .*nope.yaml"):
        load_concepts(tmp_path / "nope.yaml", Defaults())


def test_sweep_expands_every_combination_with_names(folders):
    d = Defaults(train_data_dir=str(folders / "a"), learning_rate="0.005", num_vectors=1)
    base = single_concept("cat", d)
    variants = expand_sweep([base], parse_sweep("learning_rate=2e-3,5e-3,1e-2 num_vectors=1,2"), d)
    assert [v.name for v in variants] == ["cat-lr2e-3-v1", "cat-lr2e-3-v2", "cat-lr5e-3-v1", "cat-lr5e-3-v2",
                                          "cat-lr1e-2-v1", "cat-lr1e-2-v2"]
    assert [(v.learning_rate, v.num_vectors) for v in variants][:2] == [("2e-3", 1), ("2e-3", 2)]
    assert all(v.train_data_dir == str(folders / "a") for v in variants)


@pytest.mark.parametrize("text, message", [
    ("speed=1,2", "unknown key 'speed'"), ("lr", "should be KEY=V1,V2"), ("lr=1,,2", "empty value"),
    ("lr=1 learning_rate=2", "learning_rate is given twice"), ("", "nothing to sweep"),
    ("num_vectors=1,99", "num_vectors must be 1..75"), ("lr=1,x", "learning_rate 'x'"),
])
def test_bad_sweeps(folders, text, message):
    d = Defaults(train_data_dir=str(folders / "a"))
    with pytest.raises(UserError, match=message):
        expand_sweep([single_concept("cat", d)], parse_sweep(text), d)
