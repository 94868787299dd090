"""The filter language, against the cases of containerd 1.6 filters/filter_test.go."""

from __future__ import annotations

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.filters import parse_filters

CORPUS = [
    {"name": "foo", "labels": {"foo": "true"}},
    {"name": "bar", "labels": {"bar": "true", "more complex label with \\ and \"": "present"}},
    {"name": "foo", "labels": {"foo": "omg_asdf.asdf-qwer", "more complex label": "yes"}},
    {"name": "fooer", "labels": {"more complex label with \\ and \".post": "present"}},
    {"name": "baz", "other": "too complex, yo"},
    {"name": "bazo", "other": "abc"},
    {"name": "zzz", "other": "c/"},
]


def _adaptor(obj):
    def field(path):
        if path[0] == "labels":
            labels = obj.get("labels", {})
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return obj.get(path[0], ""), path[0] in obj

    return field


def _names(text):
    flt = parse_filters([text])
    return [i for i, obj in enumerate(CORPUS) if flt.match(_adaptor(obj))]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [0, 1, 2, 3, 4, 5, 6]),
        ("name", [0, 1, 2, 3, 4, 5, 6]),
        ("labels.foo", [0, 2]),
        ("labels.foo,name", [0, 2]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [2]),
        ("name==bar", [1]),
        ("name!=bar", [0, 2, 3, 4, 5, 6]),
        ("name==bar,labels.bar", [1]),
        ('other=="too complex, yo"', [4]),
        ("other~=[abc]+,name!=foo", [4, 5, 6]),
        ("other~=/[abc]+/,name!=foo", [4, 5, 6]),
        ("other~=/[abc]{1,2}/,name!=foo", [4, 5, 6]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),  # valid, matches nothing
        ("name==bar,labels.bar==true", [1]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        (r'labels."more complex label with \\ and \""==present', [1]),
        (r'labels."more complex label with \\ and \"".post==present', [3]),
    ],
)
def test_matches(text, expected):
    assert _names(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("labels.|foo|==omg_asdf.asdf-qwer", "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered"),
        (r'labels.?"more complex label with \\ and \"".post==present',
         r'filters: parse error: [labels. >|?|< "more complex label with \\ and \"".post==present]: expected field or quoted'),
        ("name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
        ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
        ("image~=,id?=?fbaq", "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"),
        ("labels.ns/key==value", "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated"),
        ("labels.key==/value", "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated"),
    ],
)
def test_errors_match_containerds(text, message):
    with pytest.raises(InvalidArgument) as err:
        parse_filters([text])
    assert str(err.value) == message


def test_several_filters_are_ored():
    flt = parse_filters(["name==foo,labels.foo==true", "name==baz"])
    assert [i for i, o in enumerate(CORPUS) if flt.match(_adaptor(o))] == [0, 4]
