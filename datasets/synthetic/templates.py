"""Caption templates: sentence shapes that a :class:`_Verbaliser` fills with phrases."""

from __future__ import annotations

from collections.abc import Callable

from datasets.synthetic.verbaliser import _capitalise, _join, _Verbaliser


def _t_with_wears(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} with {v.hair()} {v.wear_verb()} {v.clothes()}"
    if v.bag():
        s += f", {v.carrying()} {v.bag()}"
    return s + "."


def _t_pedestrian_wearing(v: _Verbaliser) -> str:
    opener = v.pick("template", ("The pedestrian", "This person", "The person", "This pedestrian"))
    s = f"{opener} is wearing {v.clothes()}. {_capitalise(v.pron)} has {v.hair()}"
    if v.bag():
        s += f" and is carrying {v.bag()}"
    return s + "."


def _t_in_walking(v: _Verbaliser) -> str:
    outfit = v.top() if v.bottom() is None else f"{v.top()} and {v.bottom()}"
    s = f"{_capitalise(v.subject())} in {outfit} is walking"
    if v.bag():
        s += f" {v.carrying()} {v.bag()}"
    s += f". {_capitalise(v.pron)} has {v.hair()}"
    if v.shoes():
        s += f" and wears {v.shoes()}"
    return s + "."


def _t_this_has(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject('this'))} has {v.hair()}. {_capitalise(v.pron)} is dressed in {v.clothes()}"
    if v.bag():
        s += f". {_capitalise(v.pron)} carries {v.bag()}"
    return s + "."


def _t_wearing_fragment(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} wearing {v.clothes()}, with {v.hair()}"
    if v.bag():
        s += f", {v.carrying(allow_with=False)} {v.bag()}"
    return s + "."


def _t_pronoun_first(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.pron)} wears {v.top()}"
    rest = [x for x in (v.bottom(), v.shoes()) if x]
    if rest:
        s += f" with {_join(rest, oxford=False)}"
    s += f". {_capitalise(v.pron)} has {v.hair()}"
    if v.bag():
        s += f" and carries {v.bag()}"
    return s + "."


def _t_has_and_wearing(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} has {v.hair()} and is wearing {v.clothes()}."
    if v.bag():
        s += f" {_capitalise(v.pron)} carries {v.bag()}."
    return s


def _t_fragment_dressed(v: _Verbaliser) -> str:
    head = v.hair() if not v.bag() else f"{v.hair()} and {v.bag()}"
    return f"{_capitalise(v.subject())} with {head}, dressed in {v.clothes()}."


def _t_predicates(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} with {v.hair()} is wearing {v.top()}."
    preds = [x for x in (v.bottom_predicate(), v.shoes_predicate()) if x]
    if preds:
        s += f" {_capitalise(_join(preds, oxford=False))}."
    if v.bag():
        s += f" {_capitalise(v.pron)} is carrying {v.bag()}."
    return s


def _t_clothes_first(v: _Verbaliser) -> str:
    s = f"Wearing {v.clothes()}, {v.subject()} with {v.hair()} walks"
    if v.bag():
        s += f" while carrying {v.bag()}"
    return s + "."


def _t_dressed_in(v: _Verbaliser) -> str:
    outfit = v.top() if v.bottom() is None else f"{v.top()} and {v.bottom()}"
    owned = [x for x in (v.hair(), v.shoes(), v.bag()) if x]
    return f"{_capitalise(v.subject())} dressed in {outfit}. {_capitalise(v.pron)} has {_join(owned, oxford=False)}."


TEMPLATES: tuple[Callable[[_Verbaliser], str], ...] = (
    _t_with_wears,
    _t_pedestrian_wearing,
    _t_in_walking,
    _t_this_has,
    _t_wearing_fragment,
    _t_pronoun_first,
    _t_has_and_wearing,
    _t_fragment_dressed,
    _t_predicates,
    _t_clothes_first,
    _t_dressed_in,
)
