"""The one YAML loader for what operators and tenants send in: quota files, workflow definitions,
schedules and integration settings (JSON is read with it too: JSON is YAML).

PyYAML's safe loader builds nothing but plain data, yet three cheap documents still hurt whoever reads
them: an alias bomb (a few hundred bytes of ``&a [*b, *b, ...]`` that become gigabytes as soon as
anything walks the result: validation, ``json.dumps``, a database row), deep nesting (100k ``[`` make the
composer, and everything recursive after it, raise ``RecursionError``), and sheer size. This loader
refuses each of them while the document is composed, before anything is expanded:

* the text is refused past its size limit before it is parsed;
* every alias is counted (``AGENTWORKER_MAX_YAML_ALIASES``), and the bytes it would add once expanded
  are added up against the document's own size limit: aliases may not make a document bigger than its
  text may be (a recursive alias is refused outright);
* the nesting depth is tracked and refused past ``AGENTWORKER_MAX_YAML_DEPTH``, long before Python's
  recursion limit.

:func:`check_value` applies the same depth and size rules to a value that is already parsed (a dict a
Python caller passes), walking it without recursion. Every refusal is one :class:`DocumentRefused`
sentence naming the limit and its value. Scanning and parsing run in libyaml (C) when PyYAML has it; the
composer is PyYAML's own, with the counting added.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

from agentworker.errors import AgentWorkerError
from agentworker.settings import InputLimits

__all__ = ["DocumentRefused", "check_value", "decode_utf8", "load_yaml", "one_line"]


class DocumentRefused(AgentWorkerError, ValueError):
    """A document over one of the input limits, or not UTF-8: the message is one sentence."""


class _CountingComposer(Composer):
    """PyYAML's composer, counting aliases, the bytes they add once expanded, and the nesting depth."""

    if TYPE_CHECKING:  # from the parser it is mixed with
        def check_event(self, *choices: type[Event]) -> bool: ...
        def peek_event(self) -> Event: ...

    def _limit(self, *, what: str, limits: InputLimits, size_limit: str) -> None:
        self._what = what
        self._limits = limits
        self._size_limit = size_limit
        self._max_bytes: int = getattr(limits, size_limit)
        self._aliases = 0
        self._added_bytes = 0
        self._depth = 0
        #: id(node) -> its size in bytes (roughly, as JSON) with every alias inside it expanded; a node is
        #: in here once it is complete, so an alias to a node that is not is a recursive alias
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            self._aliases += 1
            if self._aliases > self._limits.max_yaml_aliases:
                raise DocumentRefused(self._limits.refusal(
                    "max_yaml_aliases", f"{self._what} uses more than {self._limits.max_yaml_aliases} YAML aliases"))
            size = self._sizes.get(id(node))
            if size is None:
                raise yaml.composer.ComposerError(None, None, "found a recursive alias (it refers to a node that "
                                                  "contains it)", mark)  # type: ignore[arg-type]  # libyaml's Mark
            self._added_bytes += size
            if self._added_bytes > self._max_bytes:
                raise DocumentRefused(self._limits.refusal(
                    self._size_limit, f"{self._what} expands to more than {self._max_bytes} bytes through its "
                                      "YAML aliases"))
            return node
        self._depth += 1
        if self._depth > self._limits.max_yaml_depth:
            start = self.peek_event().start_mark
            where = f" (at line {start.line + 1})" if start is not None else ""
            raise DocumentRefused(self._limits.refusal(
                "max_yaml_depth", f"{self._what} is nested more than {self._limits.max_yaml_depth} levels deep"
                                  f"{where}"))
        node = super().compose_node(parent, index)
        self._depth -= 1
        if node is not None:
            self._sizes[id(node)] = self._size_of(node)
        return node

    def _size_of(self, node: Node) -> int:
        sizes = self._sizes
        if isinstance(node, SequenceNode):
            return 2 + sum(sizes.get(id(child), 0) + 1 for child in node.value)
        if isinstance(node, MappingNode):
            return 2 + sum(sizes.get(id(k), 0) + sizes.get(id(v), 0) + 2 for k, v in node.value)
        return len(node.value) + 2


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LimitedLoader(_CountingComposer, CParser, SafeConstructor, Resolver):
        """libyaml scans and parses; the counting composer composes."""

        def __init__(self, text: str, **limit: Any) -> None:
            CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._limit(**limit)

else:  # pragma: no cover - PyYAML is built with libyaml on every supported platform
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _LimitedLoader(_CountingComposer, Reader, Scanner, Parser, SafeConstructor,  # type: ignore[no-redef,misc]
                         Resolver):
        def __init__(self, text: str, **limit: Any) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._limit(**limit)


def load_yaml(text: str | bytes, *, what: str, limits: InputLimits, size_limit: str) -> Any:
    """The one YAML (or JSON) document in ``text``, as plain data.

    ``what`` names the document in refusals ("the workflow definition"); ``size_limit`` is the
    :class:`~agentworker.settings.InputLimits` field that bounds its size. Raises :class:`DocumentRefused`
    (too big, too deep, too many aliases, not UTF-8) or :class:`yaml.YAMLError` (not YAML).
    """
    max_bytes: int = getattr(limits, size_limit)
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise DocumentRefused(limits.refusal(size_limit, f"{what} is {len(text)} bytes"))
        text = decode_utf8(text, what)
    elif len(text) > max_bytes or len(text.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise DocumentRefused(limits.refusal(size_limit, f"{what} is {len(text.encode('utf-8', 'surrogatepass'))} "
                                                         "bytes"))
    loader = _LimitedLoader(text, what=what, limits=limits, size_limit=size_limit)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" not in str(exc.problem):
            raise
        # libyaml's scanner looks ahead and stops at 1000 levels before the composer gets that deep
        line = f" (at line {exc.problem_mark.line + 1})" if exc.problem_mark is not None else ""
        raise DocumentRefused(limits.refusal(
            "max_yaml_depth", f"{what} is nested more than {limits.max_yaml_depth} levels deep{line}")) from None
    except RecursionError:  # not reachable with the depth limit well below the recursion limit; to be sure
        raise DocumentRefused(limits.refusal("max_yaml_depth", f"{what} is nested too deeply to read")) from None
    finally:
        loader.dispose()


def decode_utf8(data: bytes, what: str) -> str:
    """``data`` as strict UTF-8, else :class:`DocumentRefused` naming the first bad byte and its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DocumentRefused(f"{what} is not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
                              "cannot be decoded (save it as UTF-8)") from None


def check_value(value: Any, *, what: str, limits: InputLimits, size_limit: str, max_bytes: int | None = None) -> int:
    """Refuse an already-parsed value nested deeper than ``max_yaml_depth`` or bigger than the
    ``size_limit`` field of ``limits`` (or ``max_bytes``: what is left of it) counted roughly as JSON,
    shared references once per use, so a Python-built bomb is refused too; return that size. Walks
    without recursion and stops as soon as a limit is passed: the cost is bounded by the limits, not by
    the value."""
    if max_bytes is None:
        max_bytes = getattr(limits, size_limit)
    max_depth = limits.max_yaml_depth
    total = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth > max_depth:
                raise DocumentRefused(limits.refusal(
                    "max_yaml_depth", f"{what} is nested more than {max_depth} levels deep"))
            total += 2 + 2 * len(item)
            if total > max_bytes:
                break
            if isinstance(item, Mapping):
                for key, child in item.items():
                    total += len(key) + 2 if isinstance(key, str) else 8
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        else:
            total += len(item) + 2 if isinstance(item, str | bytes) else 8
        if total > max_bytes:
            break
    if total > max_bytes:
        raise DocumentRefused(limits.refusal(size_limit, f"{what} is more than {max_bytes} bytes as JSON"))
    return total


def one_line(exc: BaseException) -> str:
    """A YAML error's text on one line (PyYAML's messages span several, with a snippet of the input),
    with the line and column but without PyYAML's name for the input (``"<unicode string>"``): the
    caller names the document."""
    if isinstance(exc, yaml.MarkedYAMLError) and (exc.problem or exc.context):
        text = f"{exc.problem or exc.context}{_at(exc.problem_mark if exc.problem else exc.context_mark)}"
        if exc.problem and exc.context:
            text += f" ({exc.context}{_at(exc.context_mark)})"
    else:
        text = str(exc)
    return _STREAM_NAME.sub(" at", " ".join(text.split()))


#: how PyYAML names a document it was handed as a string: ``in "<unicode string>", line 3, column 1``
_STREAM_NAME = re.compile(r' in "<(?:unicode|byte) string>",')


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
