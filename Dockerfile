# syntax=docker/dockerfile:1
# Tollgate and gpu-sim in one image; docker-compose.yml runs both from it.
#
#   docker build -t tollgate .
#   docker run --rm tollgate tollgate --help
#
# The default command serves with config/compose.toml (listeners on 0.0.0.0,
# backends at gpu-sim-1 and gpu-sim-2), which is what docker-compose.yml uses.

# ---- build ----
FROM rust:1-bookworm AS build
# Pingora's zlib-ng and aws-lc (rustls, for Stripe and RunPod) build with cmake.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds; the binaries
# are copied out of target/ in the same step, since the mount is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate -p tollgate-backends --bin tollgate --bin gpu-sim \
 && mkdir -p /out \
 && cp target/release/tollgate target/release/gpu-sim /out/

# ---- runtime ----
FROM debian:bookworm-slim
# ca-certificates: TLS to Stripe and RunPod. curl: the HEALTHCHECK below and
# the gpu-sim services' in docker-compose.yml; it costs a few MB, and a
# hand-rolled HTTP check (bash's /dev/tcp) would not tell a 503 from a 200 as
# reliably as `curl --fail`.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid tollgate --home-dir /var/lib/tollgate --shell /usr/sbin/nologin tollgate \
 && mkdir -p /var/lib/tollgate/spool \
 && chown -R tollgate:tollgate /var/lib/tollgate
COPY --from=build /out/tollgate /out/gpu-sim /usr/local/bin/
# sql/ is not needed: `tollgate migrate` embeds the migrations (refinery's
# embed_migrations! in proxy/src/db.rs).
COPY config/ /etc/tollgate/
# The usage spool (metering.spool_dir in config/compose.toml): events wait
# here while Postgres is away and are replayed at start-up, so it must outlive
# the container.
VOLUME ["/var/lib/tollgate/spool"]
WORKDIR /var/lib/tollgate
USER tollgate
# Public API, admin API, metrics (config/compose.toml).
EXPOSE 8080 8081 9091
# /healthz on the public listener answers 200 while the gateway serves.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--output", "/dev/null", "http://127.0.0.1:8080/healthz"]
CMD ["tollgate", "--config", "/etc/tollgate/compose.toml", "serve"]
