"""Cleaning review text: `<br />` tags and HTML entities out, whitespace collapsed."""

from __future__ import annotations

import html
import re

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?(?:i|b|em|strong|p|hr|span)\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """`<br />` -> space, a few inline tags dropped, HTML entities unescaped, whitespace collapsed."""
    text = _TAG.sub(" ", _BR.sub(" ", text))
    return _SPACE.sub(" ", html.unescape(text)).strip()
