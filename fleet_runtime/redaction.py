"""Credentials out of anything a program prints: URLs with user information, flag values.

A NATS URL may carry `user:password@`; a list of them is comma-separated, and a password
may itself hold a comma, a slash or another `@` (unencoded, as people type them). So the
user information is not found by parsing each URL (a password with a `/` or `,` defeats
`urlsplit` and the split at commas) but by position: everything from a scheme's `://` up
to the last `@` before the next `://` is masked. That can mask more than the credentials
(a host, when a list mixes forms), never less.
"""

from __future__ import annotations

import re

MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# In a message a quoted URL ends at a quote or a space (the value itself was redacted before quoting).
_QUOTED_USER_INFORMATION = re.compile(r"://[^\s'\"]*@")
_OPTION_VALUE = re.compile(r"(--[A-Za-z0-9][A-Za-z0-9_-]*)=\S+")


def redact_url(text: str) -> str:
    """`nats://user:secret@host:4222` -> `nats://***@host:4222`, for one URL or a comma-separated list."""
    first = _SCHEME.search(text)
    head, rest = (text, "") if first is None else (text[:first.start()], text[first.start():])
    at = head.rfind("@")  # a URL without a scheme: `user:secret@host`
    if at >= 0:
        head = MASK + head[at:]
    return head + _mask_user_information(rest)


def redact_message(message: str) -> str:
    """An error line with URL credentials and `--flag=value` values masked (argparse quotes raw arguments)."""
    return _OPTION_VALUE.sub(rf"\1={MASK}", _QUOTED_USER_INFORMATION.sub(f"://{MASK}@", message))


def _mask_user_information(text: str) -> str:
    starts = [m.end() for m in _SCHEME.finditer(text)]
    out: list[str] = []
    done = 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        at = text.rfind("@", start, end)
        if at >= 0:
            out.append(text[done:start] + MASK)
            done = at
    out.append(text[done:])
    return "".join(out)
