"""core/filters: containerd's filter syntax, semantics, error messages and adaptors."""
import re

import pytest

from pycontainerd.core import errdefs, filters
from pycontainerd.core.filters import ALWAYS, adapt_mapping, adaptor_for, parse

CORPUS = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar"},
    {"name": "foo", "labels": {"foo": "present", "more complex label": "present"}},
    {"name": "bar", "labels": {"bar": "true"}},
    {"name": "fooer", "labels": {'more complex label with \\ and "': "present"}},
    {"name": "fooer", "labels": {'more complex label with \\ and ".post': "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "compound", "labels": {"foo": "omg_asdf.asdf-qwer"}},
]

ALL = list(range(len(CORPUS)))

MATCHING = [
    ("", ALL),
    ("name", ALL),
    ("labels.foo", [0, 2, 8]),
    ("labels.foo,name", [0, 2, 8]),
    ("labels.foo==true", [0]),
    ("labels.foo==omg_asdf.asdf-qwer", [8]),
    ("name==bar", [1, 3]),
    ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
    ("name==bar,labels.bar", [3]),
    ('other=="too complex, yo"', [6]),
    ("other~=[abc]+,name!=foo", [6, 7]),
    ("other~=/[abc]+/,name!=foo", [6, 7]),
    ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
    ('other~=/[abc]{0,1}"\\//,name!=foo', []),
    ("name==bar,labels.bar==true", [3]),
    ("name==bar,labels.bar==wrong", []),
    ('name==foo,labels."more complex label"', [2]),
    (r'labels."more complex label with \\ and \""==present', [4]),
    (r'labels."more complex label with \\ and \"".post==present', [5]),
    ("name == foo", [0, 2]),
    ("name==   foo", [0, 2]),
    ("other", [6, 7]),
    ("other!=abc", [0, 1, 2, 3, 4, 5, 6, 8]),  # != matches absent fields too
    ("other~=^$", [0, 1, 2, 3, 4, 5, 8]),       # ~= searches "" for absent fields
]


@pytest.mark.parametrize("text,expected", MATCHING)
def test_matches_like_containerd(text, expected):
    f = parse(text)
    assert [i for i, obj in enumerate(CORPUS) if f.match(adapt_mapping(obj))] == expected


@pytest.mark.parametrize("text,message", [
    ("labels.|foo|==omg_asdf.asdf-qwer",
     "[labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered"),
    (r'labels.?"more complex label with \\ and \"".post==present',
     r'[labels. >|?|< "more complex label with \\ and \"".post==present]: expected field or quoted'),
    ("name==foo,", "[name==foo,]: expected field or quoted"),
    ("labels.", "[labels.]: expected field or quoted"),
    ("image~=,id?=?fbaq", "[image~= >|,|< id?=?fbaq]: expected value or quoted"),
    ("labels.ns/key==value", "[labels.ns >|/|< key==value]: quoted literal not terminated"),
    ("labels.key==/value", "[labels.key== >|/|< value]: quoted literal not terminated"),
    # ours beyond containerd's table
    ('name=="unterminated', '[name== >|"|< unterminated]: quoted literal not terminated'),
    ('labels."open==x', '[labels. >|"|< open==x]: quoted literal not terminated'),
    ('name=="a\nb"', '[name== >|"|< a\nb"]: quoted literal not terminated'),
    ("name=x", '[name >|=|< x]: unsupported operator "="'),
    ("name===x", '[name >|=|< ==x]: unsupported operator "==="'),
    ("name!x", '[name >|!|< x]: unsupported operator "!"'),
    ("name=~x", '[name >|=|< ~x]: unsupported operator "=~"'),
    ("name@x", '[name >|@|< x]: expected an operator ("=="|"!="|"~=")'),
    ("name==", "[name==]: expected value or quoted"),
    ("name==,x", "[name== >|,|< x]: expected value or quoted"),
    ("name==.x", "[name== >|.|< x]: expected value or quoted"),
    (",", "[ >|,|< ]: expected field or quoted"),
    (",,name", "[ >|,|< ,name]: expected field or quoted"),
    ("name,,x", "[name, >|,|< x]: expected field or quoted"),
    ("==x", "[ >|=|< =x]: expected field or quoted"),
    ("   ", "[   ]: expected field or quoted"),
    ("a..b", "[a. >|.|< b]: expected field or quoted"),
    ("name==foo bar", "[name==foo >| |< bar]: unexpected input:  "),
    ("name==foo ,x", "[name==foo >| |< ,x]: unexpected input:  "),
    ('name=="x"y', '[name=="x" >|y|< ]: unexpected input: y'),
    ("topic==/tasks/exit", "[topic== >|/|< tasks/exit]: invalid quote encountered"),
    ("topic~=/tasks/.*", "[topic~=/tasks/ >|.|< *]: unexpected input: ."),
    (r'name=="bad\q"', r'[name== >|"|< bad\q"]: illegal escape sequence'),
    (r'name=="bad\x4"', r'[name== >|"|< bad\x4"]: illegal numeric escape sequence'),
    (r'name=="bad\1"', r'[name== >|"|< bad\1"]: illegal numeric escape sequence'),
    (r"name~=/a\.b/", r"[name~= >|/|< a\.b/]: illegal escape sequence"),
    (r'name=="\777"', r'[name== >|"|< \777"]: unquoting failed: quote syntax error'),
    ("name==a\x00b", "[name==a >|\x00|< b]: unexpected null"),
    ("na\x00me", "[na >|\x00|< me]: unexpected null"),
    ("name==\ufffd", "[name== >|\ufffd|< ]: rune error"),
])
def test_parse_errors_show_where(text, message):
    with pytest.raises(errdefs.InvalidArgument) as info:
        parse(text)
    assert str(info.value) == f"filters: parse error: {message}: invalid argument"


@pytest.mark.parametrize("text", ["name~=[", "name~=(a", 'name~="a{2,1}"', r'name~="\\pL"',
                                  "name~=*a", "name~=[[:nope:]]"])
def test_bad_regexp_is_invalid_argument_at_parse_time(text):
    with pytest.raises(errdefs.InvalidArgument, match=r"filters: parse error: .*invalid regular expression"):
        parse(text)


def test_regexp_error_points_at_value():
    with pytest.raises(errdefs.InvalidArgument) as info:
        parse("name==ok,image~=(unclosed")
    assert "[name==ok,image~= >|(|< unclosed]" in str(info.value)


def test_or_between_strings_and_between_selectors():
    f = parse("name==bar", "labels.foo==true")
    assert [i for i, obj in enumerate(CORPUS) if f.match(obj)] == [0, 1, 3]
    f = parse("name==bar,labels.bar", "name==baz")
    assert [i for i, obj in enumerate(CORPUS) if f.match(obj)] == [3, 6]


def test_empty_list_and_empty_string_match_everything():
    assert parse() is ALWAYS
    assert parse("") is ALWAYS
    assert parse("name==nothing", "") is ALWAYS
    assert parse().match(lambda path: ("", False))


def test_one_bad_string_fails_the_lot():
    with pytest.raises(errdefs.InvalidArgument):
        parse("name==ok", "name=bad")


def test_not_a_string():
    with pytest.raises(errdefs.InvalidArgument):
        parse(None)  # type: ignore[arg-type]


def test_quoted_field_components():
    obj = adaptor_for(labels={"a.b": "c", "with space": "x y", "x": "1", "ünï": "ok", "e": ""})
    assert parse('labels."a.b"==c').match(obj)
    assert parse("labels.a.b==c").match(obj)  # joined with "." like containerd's checkMap
    assert parse('labels."with space"=="x y"').match(obj)
    with pytest.raises(errdefs.InvalidArgument, match="illegal escape sequence"):
        parse('labels."with space"~=/x\\sy/')  # only Go escapes inside /.../
    assert parse('labels."with space"~="x\\\\sy"').match(obj)
    assert parse('labels."ünï"==ok').match(obj)
    assert parse('labels."e"').match(obj)  # present with an empty value
    assert not parse('labels."e"==x').match(obj)
    assert not parse("labels.missing").match(obj)
    assert not parse("labels").match(obj)


def test_quoted_escapes():
    obj = adaptor_for(name="tab\there", other='q"uote', path="a/b", uni="é", nl="a\nb")
    assert parse(r'name=="tab\there"').match(obj)
    assert parse(r'other=="q\"uote"').match(obj)
    assert parse("path==a/b").match(obj)          # '/' inside an unquoted value is fine
    assert parse(r"path~=/a\/b/").match(obj)       # '\/' escapes the delimiter
    assert parse("path~=|a/b|").match(obj)
    assert parse(r'uni=="\u00e9"').match(obj)
    assert parse(r'uni=="\xc3\xa9"').match(obj)    # bytes, as Go strings are
    assert parse(r'uni=="\303\251"').match(obj)
    assert parse(r'uni=="\U000000e9"').match(obj)
    assert parse(r'nl=="a\nb"').match(obj)
    assert parse("uni==é").match(obj)


def test_alt_quotes_only_for_regexp():
    with pytest.raises(errdefs.InvalidArgument, match="invalid quote encountered"):
        parse("name==|foo|")
    assert parse("name~=|^fo+$|").match(adaptor_for(name="foo"))


def test_regexp_is_unanchored_search_with_go_semantics():
    obj = adaptor_for(topic="/tasks/exit", text="line\n", word="éa", cls="x]y")
    assert parse('topic~="^/tasks/"').match(obj)
    assert parse("topic~=exit").match(obj)
    assert parse('topic~="exit$"').match(obj)
    assert not parse('text~="line$"').match(obj)      # Go's $ is end of text, not before "\n"
    assert parse('text~="(?m)line$"').match(obj)
    assert not parse(r'text~="line\\z"').match(obj)
    assert parse(r'text~="line\n\\z"').match(obj)
    assert parse('word~="^[[:alpha:]]"').match(obj) is False  # POSIX classes are ASCII
    assert parse('word~="[[:alpha:]]$"').match(obj)
    assert not parse(r'word~="^\\w"').match(obj)         # \w is ASCII in RE2
    assert parse(r'topic~="\\Q/tasks/\\E"').match(obj)
    assert parse('cls~="[]]"').match(obj)
    assert parse('cls~="[$]"').match(adaptor_for(cls="a$b"))


def test_selector_semantics_on_absent_fields():
    nothing = adaptor_for()
    assert not parse("name").match(nothing)
    assert not parse('name==""').match(nothing)
    assert parse('name!=""').match(nothing) is False  # absent reads "" and "" == ""
    assert parse("name!=x").match(nothing)
    assert parse('name~=".*"').match(nothing)
    assert not parse('name~="."').match(nothing)


def test_mapping_adaptor_types_and_nesting():
    obj = adapt_mapping({
        "name": "img", "empty": "", "flag": False, "size": 42, "none": None,
        "target": {"digest": "sha256:abc", "media_type": "x", "annotations": {"a.b": "c"}},
        "labels": {}, "list": [1, 2],
    })
    assert parse("target.digest==sha256:abc").match(obj)
    assert parse("target.annotations.a.b==c").match(obj)
    assert not parse("target").match(obj)          # a nested object has no value of its own
    assert not parse("empty").match(obj)
    assert parse("flag==false").match(obj)
    assert parse("size==42").match(obj)
    assert not parse("none").match(obj)
    assert not parse("labels").match(obj)
    assert not parse("labels.x").match(obj)
    assert not parse("list").match(obj)
    assert not parse("name.deeper").match(obj)
    assert not parse("unknown").match(obj)


def test_match_accepts_a_mapping_or_callable():
    f = parse("name==x")
    assert f.match({"name": "x"})
    assert f({"name": "x"})
    assert f.match(lambda path: ("x", True) if path == ["name"] else ("", False))


def test_filter_objects_are_inspectable():
    f = parse('name==foo,labels."a.b"')
    assert isinstance(f, filters.AllOf)
    assert f.filters[0] == filters.Selector(("name",), "==", "foo")
    assert f.filters[1] == filters.Selector(("labels", "a.b"))


def test_unquote_helper():
    assert filters.unquote('"a\\tb"') == "a\tb"
    assert filters.unquote("/a\\/b/") == "a/b"
    assert filters.unquote("|a\\|b|") == "a|b"
    assert filters.unquote("'x'") == "x"
    assert filters.unquote("`raw\\n`") == "raw\\n"
    for bad in ['"', '"a', "'ab'", '"a\\/"', '"\\x4"', '"\\400"', '"\\U00110000"', "xax"]:
        with pytest.raises(ValueError):
            filters.unquote(bad)


def test_compile_regexp_translation():
    assert filters.compile_regexp("a$").search("a\n") is None
    assert filters.compile_regexp("[[:digit:]]+").fullmatch("123")
    assert filters.compile_regexp(r"\d").search("٣") is None
    with pytest.raises(re.error):
        filters.compile_regexp("[[:^alpha:]]")


# ------------------------------------------------------------------ adapt_message (betterproto)
from dataclasses import dataclass  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Dict, List  # noqa: E402

import betterproto  # noqa: E402
from betterproto.lib.google.protobuf import Any as ProtoAny  # noqa: E402


@dataclass(eq=False, repr=False)
class _Inner(betterproto.Message):
    name: str = betterproto.string_field(1)
    terminal: bool = betterproto.bool_field(2)
    options: ProtoAny = betterproto.message_field(3)


@dataclass(eq=False, repr=False)
class _Outer(betterproto.Message):
    id: str = betterproto.string_field(1)
    pid: int = betterproto.uint32_field(2)
    inner: _Inner = betterproto.message_field(3)
    labels: Dict[str, str] = betterproto.map_field(4, betterproto.TYPE_STRING, betterproto.TYPE_STRING)
    annotations: Dict[str, str] = betterproto.map_field(5, betterproto.TYPE_STRING, betterproto.TYPE_STRING)
    at: datetime = betterproto.message_field(6)
    names: List[str] = betterproto.string_field(7)
    blob: bytes = betterproto.bytes_field(8)


def test_adapt_message_follows_containerd_fieldpath_rules():
    opts = _Inner(name="from-any")
    msg = _Outer(id="c1", pid=7, inner=_Inner(name="runc", options=ProtoAny(type_url="x", value=bytes(opts))),
                 labels={"a.b": "c", "e": ""}, annotations={"k": "v"}, at=datetime(2020, 1, 1, tzinfo=timezone.utc),
                 names=["n"], blob=b"x")
    # round trip through the wire, as the exchange sees payloads
    msg = _Outer().parse(bytes(msg))
    decode = lambda any_: _Inner().parse(any_.value) if any_.type_url == "x" else None  # noqa: E731
    adaptor = filters.adapt_message(msg, decode_any=decode)
    assert parse("id==c1").match(adaptor)
    assert parse("inner.name==runc").match(adaptor)
    assert parse("inner.terminal==false").match(adaptor)     # bools always present
    assert parse("inner.options.name==from-any").match(adaptor)
    assert not parse("inner.options.name").match(filters.adapt_message(msg))  # no decoder
    assert parse("labels.a.b==c").match(adaptor)
    assert parse('labels."a.b"').match(adaptor)
    assert parse("labels.e").match(adaptor)
    for unhandled in ("pid", "at", "names", "blob", "annotations.k", "inner", "nope", "id.x"):
        assert not parse(unhandled).match(adaptor), unhandled


def test_adapt_message_unset_submessage_is_absent():
    adaptor = filters.adapt_message(_Outer(id="x"))
    assert not parse("inner.terminal").match(adaptor)
    assert parse("inner.terminal!=false").match(adaptor)
    assert not parse("labels.a").match(adaptor)
