"""Operating a running regmirror from the command line: ``warm`` and ``status``.

These talk to a server over HTTP (the Registry API, ``/metrics``, ``/readyz`` and
``/-/status``); the argparse side lives in :mod:`regmirror.cli`.
"""
