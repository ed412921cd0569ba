"""Passwords out of everything an operator or a log collector reads.

One function, :func:`redact`, is applied to every URL, error line and log line that leaves the
process, so a password cannot slip out through a form that one caller forgot: the userinfo of a
URL (``postgresql://user:PASSWORD@host``), a ``password=`` keyword in a URL query or a libpq
conninfo string, ``PGPASSWORD=`` in an environment listing, ``"password": ...`` in JSON.

It errs on the side of hiding too much: a password is never shown in part.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from db.pgurl import PgUrl

REDACTED = "***"

# password=VALUE, sslpassword=VALUE, PGPASSWORD=VALUE, "password": "VALUE", password='VALUE'.
# An unquoted value runs to the next space or '&' (its end in a URL query or a conninfo); a
# quoted one to its closing quote, or to the end of the text when the quote is never closed.
_KEYWORD = re.compile(
    r"""(?ix)
    (?P<key>password\\?['"]?\s*(?:[=:]|%3d)\s*)
    (?P<value>'(?:[^'\\]|\\.)*(?:'|$)|"(?:[^"\\]|\\.)*(?:"|$)|[^\s&]+)
    """
)
# scheme:// and the rest of its token. The userinfo runs to the token's LAST '@': a password
# holding an unencoded '@' is hidden whole, never just up to its first '@'. Each match takes
# the whole token, so the work stays linear in the text's length, whatever the text.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,31}://)(?P<rest>[^\s'\"<>]*)")
_PLAIN_USER = re.compile(r"^[^:/?#@\[\]]*$")


def _userinfo(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    userinfo, at, after = match.group("rest").rpartition("@")
    if not at:
        return match.group(0)
    user, colon, _password = userinfo.partition(":")
    if not _PLAIN_USER.match(user):
        return f"{scheme}{REDACTED}@{after}"  # cannot tell the name from the password
    return f"{scheme}{user}{':' + REDACTED if colon else ''}@{after}"


def _keyword(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('key')}{quote}{REDACTED}{quote}"


def redact(text: str) -> str:
    """``text`` with every password form in it replaced by ``***``."""
    return _URL.sub(_userinfo, _KEYWORD.sub(_keyword, text))


def redact_url(url: PgUrl | URL) -> str:
    """A URL as it may be shown: password hidden, whether in the userinfo or in the query."""
    return redact(url.render_as_string(hide_password=True))


def redact_unparsed_url(text: str) -> str:
    """What may be shown of URL text that failed to parse or is ambiguous.

    Where the user name ends and the password does cannot be known, so everything between
    ``://`` and the last ``@`` is hidden, and so is everything after the host that follows it
    (a query may hold the password too); without an ``@`` all but the scheme is.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return REDACTED
    _, at, tail = _KEYWORD.sub(_keyword, rest).rpartition("@")
    if not at:
        return f"{scheme}://{REDACTED}"
    host = re.split(r"[/?#\s]", tail, maxsplit=1)[0]
    return f"{scheme}://{REDACTED}@{redact(host)}"
