"""The polling source contract, and reading one with a cursor.

A source is an HTTP endpoint answering ``GET`` (the schedule's ``url``, with ``cursor=<cursor>`` added to
its query once a cursor is known, and the schedule's ``headers``) with status 200 and a JSON object::

    {"items": [{"id": "o-1041", ...}, {"id": 1042, ...}], "next_cursor": "c-77"}

* ``items``: objects, each with an ``id`` (a string or an integer) unique within the source; the rest of
  the item is handed to the workflow as it is (``input.item``);
* ``next_cursor``: where the next request starts (a string or an integer), or ``null`` when the source
  has nothing after this page.

A poll reads pages while ``next_cursor`` moves on (at most ``max_pages``), and keeps the last cursor it was
given for the next poll; on ``null`` it keeps the cursor of the page it just read, so the next poll
reads that page again and finds what was appended to it. Items already seen (the last
:data:`SEEN_LIMIT` ids, kept with the cursor) are skipped, so a feed with no cursor at all — the same
list every time, newest added — works too. Anything else (a connection error, a timeout, a status other
than 200, a body that is not this shape) is a failure of the source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from agentworker import egress
from agentworker.schedules.spec import PollSource

#: item ids remembered per source, to skip items a source hands out again
SEEN_LIMIT = 1000
#: largest response body read from a source
MAX_BODY_BYTES = 5 * 1024 * 1024
_MAX_ID_LENGTH = 500


class SourceError(Exception):
    """The source failed (unreachable, bad status, or a body not in the contract's shape); one sentence."""


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ReadResult:
    #: items not seen before, in the order the source gave them
    new_items: list[dict[str, Any]]
    #: their ids, as strings
    new_ids: list[str]
    #: the cursor the next poll starts from
    cursor: str | None
    pages: int


def item_id(item: Any, index: int) -> str:
    if not isinstance(item, dict):
        raise SourceError(f"items[{index}] is not an object")
    value = item.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise SourceError(f"items[{index}] has no 'id' (a string or an integer)")
    text = str(value)
    if not 1 <= len(text) <= _MAX_ID_LENGTH:
        raise SourceError(f"items[{index}].id must be 1 to {_MAX_ID_LENGTH} characters")
    return text


def parse_page(body: bytes) -> Page:
    """Check a response body against the contract."""
    try:
        document = json.loads(body)
    except ValueError:
        raise SourceError("the response is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise SourceError("the response is not an object with an 'items' list")
    cursor = document.get("next_cursor")
    if cursor is not None and (isinstance(cursor, bool) or not isinstance(cursor, str | int)):
        raise SourceError("'next_cursor' must be a string, an integer or null")
    items = document["items"]
    for index, item in enumerate(items):
        item_id(item, index)
    return Page(items=items, next_cursor=None if cursor is None else str(cursor))


async def fetch_page(session: aiohttp.ClientSession, source: PollSource, cursor: str | None) -> Page:
    params = {} if cursor is None else {"cursor": cursor}
    headers = {"Accept": "application/json", **{k: v.get_secret_value() for k, v in source.headers.items()}}
    try:
        async with session.get(source.url, params=params, headers=headers) as response:
            if response.status != 200:
                raise SourceError(f"the source answered HTTP {response.status}")
            body = await response.content.read(MAX_BODY_BYTES + 1)
    except TimeoutError:
        raise SourceError(f"the source did not answer within {source.timeout:g}s") from None
    except egress.EgressRefused as exc:
        raise SourceError(str(exc)) from None
    except aiohttp.ClientError as exc:
        raise SourceError(f"cannot reach the source: {type(exc).__name__}") from None
    if len(body) > MAX_BODY_BYTES:
        raise SourceError(f"the response is larger than {MAX_BODY_BYTES} bytes")
    return parse_page(body)


async def read_source(source: PollSource, cursor: str | None, seen: set[str]) -> ReadResult:
    """Read the pages after ``cursor``; return the items whose ids are not in ``seen``."""
    new_items: list[dict[str, Any]] = []
    new_ids: list[str] = []
    fresh = set(seen)
    pages = 0
    timeout = aiohttp.ClientTimeout(total=source.timeout)
    async with egress.http_session(timeout=timeout) as session:
        while pages < source.max_pages:
            page = await fetch_page(session, source, cursor)
            pages += 1
            for index, item in enumerate(page.items):
                identifier = item_id(item, index)
                if identifier not in fresh:
                    fresh.add(identifier)
                    new_items.append(item)
                    new_ids.append(identifier)
            if page.next_cursor is None or page.next_cursor == cursor:
                break
            cursor = page.next_cursor
            if not page.items:
                break
    return ReadResult(new_items=new_items, new_ids=new_ids, cursor=cursor, pages=pages)
