"""Fleet mode: hosts sharing one S3 bucket make one upstream fetch per blob between them.

- :mod:`~regmirror.fleet.leases`: who fills a blob, decided by a conditional write of a
  lease object in the bucket (``If-None-Match: *``), renewed while the fill progresses,
  taken over (``If-Match`` on its ETag) when its owner dies, stalls or cannot be reached.
- :mod:`~regmirror.fleet.credential`: how peers prove they are peers (HMAC over a shared
  ``fleet.secret``).
- :mod:`~regmirror.fleet.peers`: the client that streams a blob from its owner's partial
  file while it grows.
- :mod:`~regmirror.fleet.coordinator`: the fill source that puts these together.
- :mod:`~regmirror.fleet.tags`: tag revalidations shared through the bucket.
"""
