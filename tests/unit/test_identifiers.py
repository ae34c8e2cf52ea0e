"""core/identifiers: containerd's identifier and label rules, with its messages."""
import pytest

from pycontainerd.core import errdefs
from pycontainerd.core.identifiers import (
    IDENTIFIER_PATTERN,
    go_quote,
    is_valid,
    validate,
    validate_label,
    validate_labels,
)

VALID = [
    "default", "k8s.io", "a", "A", "0", "foo_bar", "foo-bar", "foo.bar", "a.b-c_d", "1.2.3",
    "moby", "Foo9.BAR_z-1", "a" * 76, "x" + ".y" * 37 + "z",
]

INVALID = [
    "-a", "a-", ".a", "a.", "_a", "a_", "a..b", "a--b", "a._b", "../x", "a/b", "a b", " a", "a ",
    "a\n", "\na", "a\x00", "a:b", "a@b", "é", "aé", "ａ", "a\u200bb", "🐳",
]


@pytest.mark.parametrize("name", VALID)
def test_valid(name):
    assert validate(name) == name
    assert is_valid(name)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_pattern(name):
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate(name)
    assert str(info.value) == f"identifier {go_quote(name)} must match {IDENTIFIER_PATTERN}: invalid argument"
    assert not is_valid(name)


def test_pattern_text_is_containerds():
    assert IDENTIFIER_PATTERN == r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"


def test_message_for_path_traversal():
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate("../x")
    assert str(info.value) == (
        'identifier "../x" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: invalid argument')


def test_empty():
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate("")
    assert str(info.value) == "identifier must not be empty: invalid argument"
    assert not is_valid("")


def test_77_chars_too_long():
    name = "a" * 77
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate(name)
    assert str(info.value) == (
        f'identifier "{name}" greater than maximum length (76 characters): invalid argument')


def test_length_is_counted_in_bytes_like_go():
    # 39 two-byte characters are 78 bytes: containerd reports the length, not the pattern.
    name = "é" * 39
    with pytest.raises(errdefs.InvalidArgument, match="greater than maximum length"):
        validate(name)
    with pytest.raises(errdefs.InvalidArgument, match="must match"):
        validate("é" * 38)


def test_not_a_string():
    with pytest.raises(errdefs.InvalidArgument):
        validate(None)  # type: ignore[arg-type]
    with pytest.raises(errdefs.InvalidArgument):
        validate(b"abc")  # type: ignore[arg-type]
    assert not is_valid(None)  # type: ignore[arg-type]


def test_go_quote():
    assert go_quote("abc") == '"abc"'
    assert go_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert go_quote("a\nb\tc") == '"a\\nb\\tc"'
    assert go_quote("\x00\x7f") == '"\\x00\\x7f"'
    assert go_quote("é 🐳") == '"é 🐳"'
    assert go_quote("\u00a0\u200b") == '"\\u00a0\\u200b"'


def test_labels_ok():
    validate_labels(None)
    validate_labels({})
    validate_labels({"a": "b", "containerd.io/gc.ref.content": "sha256:" + "0" * 64, "": ""})
    validate_label("k" * 2048, "v" * 2048)


def test_labels_too_big():
    key = "io.example.much-too-long-key"
    with pytest.raises(errdefs.InvalidArgument) as info:
        validate_labels({"ok": "1", key: "v" * 4096})
    assert str(info.value) == (
        "label key and value greater than maximum size (4096 bytes), key: io.example: invalid argument")


def test_labels_size_in_bytes():
    validate_label("k", "v" * 4095)
    with pytest.raises(errdefs.InvalidArgument, match="key: k:"):
        validate_label("k", "v" * 4094 + "é")  # 4097 bytes


def test_labels_short_key_shown_whole():
    with pytest.raises(errdefs.InvalidArgument, match=r"key: short: invalid argument$"):
        validate_labels({"short": "x" * 5000})


def test_labels_must_be_strings():
    with pytest.raises(errdefs.InvalidArgument):
        validate_labels({"a": 1})  # type: ignore[dict-item]
