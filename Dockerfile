# regmirror as a container. Build: docker build -t regmirror .
#
# Run it on every host with host networking, so that the Docker daemon's pulls from
# localhost:5000 arrive from 127.0.0.1 (auth.anonymous_pull allows loopback by default;
# through a published port they would arrive from the bridge gateway instead):
#
#   docker run -d --name regmirror --restart unless-stopped --network host \
#     --stop-timeout 45 -v regmirror-data:/var/lib/regmirror \
#     -e REGMIRROR_S3__BUCKET=my-registry regmirror
#
# --stop-timeout: SIGTERM drains in-flight requests for up to 30 s; docker's default
# of 10 s would SIGKILL the drain half-way.
#
# It serves with one process per CPU the container may use (server.workers: 0): all
# the host's cores unless --cpus (a CFS quota) or --cpuset-cpus limits it; e.g.
# --cpus 2 for two, or -e REGMIRROR_SERVER__WORKERS=1 for a single process.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so a bind-mounted data directory can be chowned to it on the host.
RUN groupadd --system --gid 10001 regmirror \
 && useradd --system --uid 10001 --gid regmirror --home-dir /var/lib/regmirror \
        --no-create-home --shell /usr/sbin/nologin regmirror \
 && install -d -o regmirror -g regmirror -m 0750 /var/lib/regmirror

WORKDIR /src
COPY pyproject.toml README.md ./
COPY regmirror ./regmirror
RUN pip install --no-cache-dir . \
 && cd / && rm -rf /src

WORKDIR /var/lib/regmirror
USER regmirror:regmirror
VOLUME ["/var/lib/regmirror"]
EXPOSE 5000

# Flags win over REGMIRROR_* variables and the config file, so listen and data_dir are
# fixed here; everything else comes from -e REGMIRROR_... or from an appended
# `--config /etc/regmirror/config.yml` (mount the file read-only).
STOPSIGNAL SIGTERM
# With tls on the registry port, probe the plain-HTTP metrics_listen port instead:
# -e REGMIRROR_METRICS_LISTEN=127.0.0.1:9105 -e HEALTHCHECK_URL=http://127.0.0.1:9105/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:5000/healthz'), timeout=4).status == 200 else 1)"]
ENTRYPOINT ["regmirror", "serve", "--listen", "0.0.0.0:5000", "--data-dir", "/var/lib/regmirror"]
CMD []
