"""Specification of pipeline specs: the one-line text form, YAML files and TOML files."""

from __future__ import annotations

import pytest

from bitpass.frontend.errors import UsageError
from bitpass.passes.spec import looks_like_file, parse_file, parse_text, parse_value

# --- text ----------------------------------------------------------------------


def test_names_and_options():
    assert parse_text("fold-constants,fuse,calibrate(method=percentile,percentile=99.9),quantize") == [
        ("fold-constants", {}), ("fuse", {}), ("calibrate", {"method": "percentile", "percentile": 99.9}),
        ("quantize", {}),
    ]


def test_whitespace_around_items_and_options_is_ignored():
    assert parse_text(" fuse , prune( sparsity = 0.3 , kind = n:m ) ") == [
        ("fuse", {}), ("prune", {"sparsity": 0.3, "kind": "n:m"})]


def test_empty_parentheses_mean_no_options():
    assert parse_text("quantize()") == [("quantize", {})]


@pytest.mark.parametrize(("text", "value"), [
    ("4", 4), ("-2", -2), ("4.5", 4.5), ("1e-3", 1e-3), ("true", True), ("False", False), ("none", None),
    ("null", None), ("hutchinson", "hutchinson"), ("'8'", "8"), ('"true"', "true"), ("''", ""),
    ("[4,8]", [4, 8]), ("[]", []), ("[a, 'b,c', 2.5]", ["a", "b,c", 2.5]),
])
def test_values_are_typed(text, value):
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_quoted_values_may_hold_commas_parentheses_and_equals():
    assert parse_text('calibrate(path="a,b(c).npz",label=\'x=y\'),quantize') == [
        ("calibrate", {"path": "a,b(c).npz", "label": "x=y"}), ("quantize", {})]


def test_list_values():
    assert parse_text("allocate-bits(widths=[2,4,8],avg_bits=4.5)") == [
        ("allocate-bits", {"widths": [2, 4, 8], "avg_bits": 4.5})]


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("   ", "empty"),
    ("fuse,,quantize", "empty item"),
    ("fuse,", "empty item"),
    (",fuse", "empty item"),
    ("calibrate(method=minmax", "unbalanced '('"),
    ("calibrate)", "unbalanced ')'"),
    ("prune(widths=[4,8)", "unbalanced"),
    ('calibrate(path="a.npz)', "unterminated quote"),
    ("calibrate(method=minmax)quantize", "cannot read"),
    ("sensitivity(method=hutchinson(samples=4))", "nested parentheses"),
    ("outer(inner(x=1))", "nested parentheses"),
    ("Fold_Constants", "not a pass name"),
    ("fold constants", "not a pass name"),
    ("-fuse", "not a pass name"),
    ("fuse-", "not a pass name"),
    ("quantize(8)", "not key=value"),
    ("quantize(=8)", "not key=value"),
    ("quantize(bits=8,)", "not key=value"),
    ("quantize(bad-key=1)", "not an option name"),
    ("quantize(bits=8,bits=4)", "given twice"),
])
def test_malformed_text_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_text(text)


def test_errors_quote_the_whole_spec():
    with pytest.raises(UsageError) as err:
        parse_text("fuse,Bad")
    assert "'fuse,Bad'" in str(err.value) and "'Bad'" in str(err.value)


# --- files -----------------------------------------------------------------------

YAML = """\
# the default compile, written out
passes:
  - fold-constants
  - calibrate: {method: entropy, num_bins: 128}
  - name: quantize
    per_channel: true
  - fuse:
"""

TOML = """\
[[passes]]
name = "fold-constants"

[[passes]]
name = "calibrate"
method = "entropy"
num_bins = 128

[[passes]]
name = "allocate-bits"
widths = [4, 8]
"""

EXPECTED = [("fold-constants", {}), ("calibrate", {"method": "entropy", "num_bins": 128})]


def test_yaml_file(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(YAML)
    assert parse_file(path) == [*EXPECTED, ("quantize", {"per_channel": True}), ("fuse", {})]


def test_yml_suffix_is_yaml(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("passes: [fuse, quantize]\n")
    assert parse_file(str(path)) == [("fuse", {}), ("quantize", {})]


def test_toml_file(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text(TOML)
    assert parse_file(path) == [*EXPECTED, ("allocate-bits", {"widths": [4, 8]})]


def test_toml_array_of_names(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('passes = ["fuse", "quantize"]\n')
    assert parse_file(path) == [("fuse", {}), ("quantize", {})]


@pytest.mark.parametrize(("suffix", "text", "message"), [
    (".yaml", "", "non-empty top-level 'passes' list"),
    (".yaml", "steps: [fuse]\n", "non-empty top-level 'passes' list"),
    (".yaml", "passes: []\n", "non-empty top-level 'passes' list"),
    (".yaml", "passes: fuse\n", "non-empty top-level 'passes' list"),
    (".yaml", "passes:\n  - calibrate: minmax\n", "options must be a mapping"),
    (".yaml", "passes:\n  - {fuse: {}, quantize: {}}\n", "cannot read pipeline entry 1"),
    (".yaml", "passes:\n  - 42\n", "cannot read pipeline entry 1"),
    (".yaml", "passes:\n  - fuse\n  - Bad_Name\n", "pass 2: 'Bad_Name' is not a pass name"),
    (".yaml", "passes:\n  - quantize: {bad-key: 1}\n", "'bad-key' is not an option name"),
    (".yaml", "passes: [fuse\n", "pipeline file"),
    (".toml", "[[passes]]\nname = \n", "pipeline file"),
    (".toml", "[[passes]]\nmethod = 'entropy'\n", "needs a 'name' key"),
    (".toml", "[[passes]]\nmethod = 'entropy'\nbits = 4\n", "cannot read pipeline entry 1"),
])
def test_malformed_files_are_usage_errors_naming_the_file(tmp_path, suffix, text, message):
    path = tmp_path / f"pipeline{suffix}"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        parse_file(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        parse_file(tmp_path / "absent.yaml")


def test_file_specs_are_told_from_text_by_suffix():
    assert looks_like_file("p.yaml") and looks_like_file("dir/p.yml") and looks_like_file("p.toml")
    assert not looks_like_file("fuse,quantize") and not looks_like_file("calibrate(path=x.npz)")


# --- bombs and odd files ---------------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['a0: &a0 ["fuse"]'] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join([*lines, "passes: *a9"]) + "\n")
    with pytest.raises(UsageError, match="expands to more than 10,000 YAML nodes") as err:
        parse_file(path)
    assert len(str(err.value)) < 300


def test_anchors_within_the_cap_still_work(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("common: &c {method: entropy}\npasses:\n  - calibrate: *c\n  - quantize\n")
    assert parse_file(path) == [("calibrate", {"method": "entropy"}), ("quantize", {})]


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("passes: &p\n  - *p\n")
    with pytest.raises(UsageError, match="refers to itself"):
        parse_file(path)


@pytest.mark.parametrize("suffix, content, message", [
    (".yaml", "passes:\n  - fuse # caf\xe9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9"),
    (".yaml", b"passes: " + b"[" * 3000 + b"]" * 3000, "nested more than 32 levels"),
    (".yaml", b"passes: " + b"[" * 40 + b"]" * 40, "nested more than 32 levels"),
    (".toml", b"x = " + b"[" * 3000 + b"]" * 3000, "nested more than 32 levels"),
    (".toml", b"x = " + b"[" * 40 + b"]" * 40, "nested more than 32 levels"),
])
def test_odd_pipeline_files_are_one_line_usage_errors(tmp_path, suffix, content, message):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        parse_file(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_a_pipeline_file_over_a_mebibyte_is_refused_unread(tmp_path):
    path = tmp_path / "p.yaml"
    with path.open("wb") as handle:
        handle.truncate(2 << 30)  # sparse
    with pytest.raises(UsageError, match="at most 1,048,576 bytes"):
        parse_file(path)


def test_messages_quote_long_specs_shortened():
    spec = "fuse(" + "x" * 10_000 + "=1,y=(2))"
    with pytest.raises(UsageError) as err:
        parse_text(spec)
    assert len(str(err.value)) < 300


def test_deeply_nested_list_values_are_refused():
    with pytest.raises(UsageError, match="nested more than 32 deep"):
        parse_text("fuse(x=" + "[" * 100 + "]" * 100 + ")")
    assert parse_text("fuse(x=[[1],[2]])") == [("fuse", {"x": [[1], [2]]})]
