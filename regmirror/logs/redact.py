"""URLs as they may be shown in a log line or an error: without what authenticates."""

from __future__ import annotations

from yarl import URL


def without_secrets(url: str | URL) -> str:
    """``url`` without userinfo, query string or fragment: a presigned blob URL's
    signature and a ``user:password@`` never reach a log line or a client."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        if parsed.user is not None or parsed.password is not None:
            parsed = parsed.with_user(None)
        shown = parsed.with_query(None).with_fragment(None)
    except (TypeError, ValueError):
        return "<unparsable URL>"
    text = str(shown)
    return text + "?…" if parsed.raw_query_string else text
