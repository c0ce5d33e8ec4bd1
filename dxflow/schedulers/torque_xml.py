"""Torque's ``qstat -f -x``: the XML Torque's own writer makes, which is not quite XML.

Torque's MXML writer copies every value as it is, except that each ``<`` becomes the byte
0x0E (``MXMLSetVal``: "strip '<' symbols … must replace temp hack 14 w/ &lt;"); ``&``, ``>``
and any other byte of a job's name or variables stay raw (``MXMLToString`` copies
``E->Val`` with ``strcpy``) — ``src/lib/Libutils/u_MXML.c``, adaptivecomputing/torque.
One job named ``a&b`` therefore makes a whole listing invalid for an XML parser, and 0x0E
is not an XML character at all.

What makes it readable anyway: element names are attribute names (letters, digits, ``_``,
``.``, ``-``), and no value can hold a ``<``. So the text splits at every ``<`` into tags
and values without ambiguity, whatever a job's owner put into its name: a value can never
open or close an element. Values are returned with 0x0E turned back into ``<`` and nothing
else decoded (Torque encodes nothing else, so ``&amp;`` in a value is those five characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TAG = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_.\-]*)\s*(/?)>")
_SKIP = re.compile(r"<\?.*?\?>|<!--.*?-->", re.S)   # a declaration or a comment, should one ever appear
LT = "\x0e"  # what Torque writes for "<" inside a value


@dataclass
class Element:
    tag: str
    text: str = ""
    children: list[Element] = field(default_factory=list)


def parse(text: str) -> Element:
    """The document's root element; :class:`ValueError` if the tags do not nest."""
    top = Element("")
    stack = [top]
    pos = 0
    while pos < len(text):
        lt = text.find("<", pos)
        if lt < 0:
            lt = len(text)
        if lt > pos:  # a value (or whitespace between elements)
            stack[-1].text += text[pos:lt].replace(LT, "<")
            pos = lt
            continue
        skip = _SKIP.match(text, pos)
        if skip:
            pos = skip.end()
            continue
        m = _TAG.match(text, pos)
        if not m:
            raise ValueError(f"not a tag at offset {pos}: {text[pos:pos + 40]!r}")
        closing, name, empty = m.group(1), m.group(2), m.group(3)
        if closing:
            if len(stack) < 2 or stack[-1].tag != name:
                raise ValueError(f"</{name}> at offset {pos} closes nothing open")
            stack.pop()
        else:
            el = Element(name)
            stack[-1].children.append(el)
            if not empty:
                stack.append(el)
        pos = m.end()
    if len(stack) != 1:
        raise ValueError(f"<{stack[-1].tag}> is never closed (output cut short?)")
    if len(top.children) != 1:
        raise ValueError(f"expected one root element, found {len(top.children)}")
    return top.children[0]


def jobs(text: str) -> list[tuple[str, dict[str, str]]]:
    """(Job_Id, attributes) of every ``<Job>``; a nested attribute (``Resource_List``) is flattened
    to ``Resource_List.walltime``."""
    out = []
    for job in _iter(parse(text), "Job"):
        attrs: dict[str, str] = {}
        for child in job.children:
            if child.children:
                for sub in child.children:
                    attrs[f"{child.tag}.{sub.tag}"] = sub.text
            else:
                attrs[child.tag] = child.text
        if attrs.get("Job_Id"):
            out.append((attrs["Job_Id"], attrs))
    return out


def _iter(el: Element, tag: str):
    if el.tag == tag:
        yield el
        return
    for child in el.children:
        yield from _iter(child, tag)
