"""Tag lists, the catalog and the referrers index, with ``n`` / ``last`` pagination."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from regmirror.api import params
from regmirror.api.keys import REGISTRY
from regmirror.manifest import OCI_INDEX


async def list_tags(request: web.Request) -> web.Response:
    name = params.name(request)
    tags = await request.app[REGISTRY].tags(name, ns=request.query.get("ns"))
    items, link = _paginate(request, tags)
    return _listing({"name": name, "tags": items}, link)


async def catalog(request: web.Request) -> web.Response:
    items, link = _paginate(request, await request.app[REGISTRY].catalog())
    return _listing({"repositories": items}, link)


async def referrers(request: web.Request) -> web.Response:
    """OCI 1.1 referrers: an image index of the manifests whose subject is the digest."""
    name = params.name(request)
    subject = params.digest(request.match_info["digest"])
    found = await request.app[REGISTRY].referrers(name, subject)
    headers = {}
    wanted = request.query.get("artifactType")
    if wanted is not None:
        found = [d for d in found if d.artifact_type == wanted]
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in found],
    }
    # The media type exactly, with no charset parameter: clients compare it as a string.
    response = web.json_response(body, headers=headers)
    response.content_type, response.charset = OCI_INDEX, None
    return response


def _paginate(request: web.Request, items: list[str]) -> tuple[list[str], str | None]:
    limit, last = params.page(request)
    if last is not None:
        items = [item for item in items if item > last]
    if limit is None or len(items) <= limit:
        return items, None
    page = items[:limit]
    if not page:
        return page, None
    # The next page goes to the same repository: containerd's ?ns= routes it.
    ns = {"ns": request.query["ns"]} if "ns" in request.query else {}
    query = urlencode({"n": limit, "last": page[-1], **ns})
    return page, f'<{request.path}?{query}>; rel="next"'


def _listing(body: dict[str, object], link: str | None) -> web.Response:
    return web.json_response(body, headers={"Link": link} if link else None)
