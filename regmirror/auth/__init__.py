"""Access control: who may pull, push and delete (htpasswd or Docker token auth).

- :mod:`~regmirror.auth.access`: the access a request needs, from its route and method.
- :mod:`~regmirror.auth.htpasswd` and :mod:`~regmirror.auth.rules`: Basic credentials
  checked against a bcrypt htpasswd file, permissions from ``auth.rules``.
- :mod:`~regmirror.auth.token`: Bearer tokens signed by a trusted token service.
- :mod:`~regmirror.auth.controllers`: one access controller per scheme (Basic, Bearer).
- :mod:`~regmirror.auth.clients`: the client's address (``X-Forwarded-For`` from trusted
  proxies only) and the networks that may pull anonymously.
- :mod:`~regmirror.auth.middleware`: applies them to every request, so handlers never
  see credentials.
"""
