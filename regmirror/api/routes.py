"""The URL map. Repository names contain slashes, so they match ``.+``."""

from __future__ import annotations

from aiohttp import web

from regmirror.api import base, blobs, listing, manifests, status, uploads

NAME = "/v2/{name:.+}"


def add_routes(app: web.Application, *, metrics: bool = True) -> None:
    """The registry API, the probes, and ``/metrics`` unless another port serves it."""
    r = app.router
    # aiohttp tries the routes below /v2 in the order they are added, so the pulls'
    # (nearly all requests) come first; no two routes match one path and method.
    r.add_get(f"{NAME}/manifests/{{reference}}", manifests.get_manifest)  # and HEAD
    r.add_put(f"{NAME}/manifests/{{reference}}", manifests.put_manifest)
    r.add_delete(f"{NAME}/manifests/{{reference}}", manifests.delete_manifest)
    r.add_get(f"{NAME}/blobs/{{digest}}", blobs.get_blob)  # and HEAD
    r.add_delete(f"{NAME}/blobs/{{digest}}", blobs.delete_blob)
    r.add_get("/v2/", base.version_check)
    r.add_get("/v2", base.version_check)
    r.add_get("/v2/_catalog", listing.catalog)
    r.add_get(f"{NAME}/tags/list", listing.list_tags)
    r.add_get(f"{NAME}/referrers/{{digest}}", listing.referrers)
    for start in (f"{NAME}/blobs/uploads/", f"{NAME}/blobs/uploads"):
        r.add_post(start, uploads.start_upload, expect_handler=uploads.expect_continue)
    session = f"{NAME}/blobs/uploads/{{uuid}}"
    r.add_patch(session, uploads.patch_upload, expect_handler=uploads.expect_continue)
    r.add_put(session, uploads.finish_upload, expect_handler=uploads.expect_continue)
    r.add_get(session, uploads.upload_status, allow_head=False)
    r.add_delete(session, uploads.cancel_upload)
    add_probe_routes(app, metrics=metrics)


def add_probe_routes(app: web.Application, *, metrics: bool = True) -> None:
    """The unauthenticated operational endpoints (also all of ``metrics_listen``)."""
    if metrics:
        app.router.add_get("/metrics", base.metrics)
    app.router.add_get("/healthz", base.healthz)
    app.router.add_get("/readyz", base.readyz)
    if metrics:
        status.setup(app)  # GET /-/status goes wherever /metrics does
