"""Logging: the access log (one line per request), the formatters behind ``log.format``,
and what a request's line says about where its bytes came from (:mod:`.served`)."""
