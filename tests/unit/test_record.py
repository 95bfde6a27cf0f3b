import pytest

from nagaya.record import Factory, Record


class Point(Record):
    x: int
    y: int = 0
    tags: list[str] = Factory(list)


class Frozen(Record):
    _frozen = True
    a: str


def test_fields_defaults_and_factories():
    p, q = Point(1), Point(1)
    assert (p.x, p.y, p.tags) == (1, 0, [])
    p.tags.append("t")
    assert q.tags == [] and p != q and Point(1, 2) == Point(x=1, y=2)
    assert p.to_dict() == {"x": 1, "y": 0, "tags": ["t"]} and "Point(x=1" in repr(p)


def test_errors_and_frozen():
    with pytest.raises(TypeError):
        Point()
    with pytest.raises(TypeError):
        Point(1, z=3)
    f = Frozen("v")
    assert hash(f) == hash(Frozen("v")) and {f, Frozen("v")} == {f}
    with pytest.raises(AttributeError):
        f.a = "w"
    with pytest.raises(TypeError):
        hash(Point(1))
