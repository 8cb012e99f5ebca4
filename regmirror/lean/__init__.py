"""The fast path: what the registry holds in memory answered below aiohttp.

A manifest GET costs ~45 µs of CPU in aiohttp's request machinery alone (an empty
handler, ``bench/aiohttp_floor.py``) before regmirror's middlewares and handler run;
nginx serves a small static file for ~9. The listener (:mod:`regmirror.connections`)
therefore reads each request of a connection itself first (:mod:`regmirror.lean.wire`):
one that arrived whole, without a body, and asks for something answered from memory
(:mod:`regmirror.lean.manifests`) is answered there, with the same bytes, metrics and
access line aiohttp's path would produce. Anything else, including every error, goes
to aiohttp as before; a connection whose bytes the fast path cannot follow (a body,
a request split over reads, pipelining) is aiohttp's alone from then on.
"""
