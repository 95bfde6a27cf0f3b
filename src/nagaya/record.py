"""`Record`: typed value objects for the modules on `nagaya run`'s start-up path.

dataclasses would do, but importing it pulls in `inspect` and `ast`, and each class costs an exec;
together that is a third of a container's start-up time. A Record declares its fields the same way
(annotations, class-level defaults, `Factory(list)` for mutable ones) and gets __init__, __repr__,
__eq__ (and __hash__ when `_frozen`), and `to_dict()`.
"""

from __future__ import annotations


class Factory:
    """A default made anew for each object (like dataclasses.field(default_factory=...))."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn


class Record:
    _frozen = False

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        cached = cls.__dict__.get("_record_fields")
        if cached is None:
            names: list[str] = []
            for klass in reversed(cls.__mro__):
                for n in klass.__dict__.get("__annotations__", {}):  # noqa: RUF063 - inspect is what we avoid
                    if not n.startswith("_") and n not in names:
                        names.append(n)
            cached = tuple(names)
            cls._record_fields = cached
        return cached

    def __init__(self, *args: object, **kwargs: object) -> None:
        names = self._fields()
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} arguments")
        cls = type(self)
        for i, name in enumerate(names):
            if i < len(args):
                value = args[i]
            elif name in kwargs:
                value = kwargs.pop(name)
            else:
                try:
                    value = getattr(cls, name)
                except AttributeError:
                    raise TypeError(f"{cls.__name__}: missing field {name!r}") from None
                if isinstance(value, Factory):
                    value = value.fn()
            object.__setattr__(self, name, value)
        if kwargs:
            raise TypeError(f"{cls.__name__}: unknown field(s) {', '.join(kwargs)}")

    def to_dict(self) -> dict[str, object]:
        return {n: getattr(self, n) for n in self._fields()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self._fields())

    def __hash__(self) -> int:
        if not self._frozen:
            raise TypeError(f"unhashable type: {type(self).__name__}")
        return hash(tuple(getattr(self, n) for n in self._fields()))

    def __setattr__(self, name: str, value: object) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)
