# switchyard container image.
#
#   docker build -t switchyard .
#   docker run --rm -p 8080:8080 --stop-timeout 40 \
#     -v "$PWD/prod.toml:/etc/switchyard/switchyard.toml:ro" switchyard
#
# The bundled /etc/switchyard/switchyard.toml is the repository's example config. Mount
# your own config over it. Inside a container:
#   * [proxy] listen must be "0.0.0.0:8080" (or "[::]:8080"). The example binds
#     127.0.0.1, which can't be reached through a published port.
#   * [admin] listen should stay on loopback ("127.0.0.1:9901") unless admin.token_file
#     is set (required for any other address); bind it wider only with a token. The HEALTHCHECK
#     below connects to 127.0.0.1:9901, so change it if you move the admin port.
#   * Backend addresses are IP:port or host:port reachable from the container (a Compose
#     service name works: examples/compose/).
#   * Give `docker stop` (--stop-timeout / stop_grace_period) more time than
#     proxy.shutdown_delay + proxy.shutdown_timeout (defaults 0s + 30s). Docker's own
#     default of 10s would SIGKILL in-flight requests.

# ---- build -----------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# protoc: the etcd-client crate compiles etcd's protobuf definitions.
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
# Cargo.toml declares a bench target, so benches/ must be present for the manifest to load.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY standins ./standins
RUN cargo build --release --locked

# ---- runtime ---------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 switchyard \
 && useradd --system --uid 10001 --gid switchyard --no-create-home \
      --home-dir /var/lib/switchyard --shell /usr/sbin/nologin switchyard \
 && mkdir -p /etc/switchyard /var/lib/switchyard \
 && chown switchyard:switchyard /var/lib/switchyard

COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.toml /etc/switchyard/switchyard.toml

# The state file ([state] path, relative to the working directory by default) lives here.
WORKDIR /var/lib/switchyard
VOLUME ["/var/lib/switchyard"]
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# 8080: proxy, 8443: HTTPS when [proxy.tls] listens there (docs/tls.md; mount the
# certificates and send SIGHUP or let the file poll pick up renewals), 9901: admin.
EXPOSE 8080 8443 9901
# SIGTERM starts the graceful shutdown: /readyz turns 503, serve for shutdown_delay,
# drain in-flight requests up to shutdown_timeout, exit 0.
STOPSIGNAL SIGTERM

# The slim image has no curl. bash's /dev/tcp sends GET /healthz to the admin listener,
# and the check passes only on a 200 status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n' >&3 && IFS= read -r -t 2 status <&3 && [[ $status == 'HTTP/1.1 200 '* ]] || exit 1"]

ENTRYPOINT ["switchyard"]
CMD ["run", "--config", "/etc/switchyard/switchyard.toml"]
