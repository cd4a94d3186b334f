# syntax=docker/dockerfile:1
#
# One image for every role of seckill: `serve`, `serve --no-workers`, `worker`,
# `migrate`, and the ops commands (`token`, `tokens`, `reconcile`, `recover`).
#
#   docker build -t seckill:local .
#   docker run --rm seckill:local --help
#
# docker-compose.yml builds it and runs the production-like topology.

# ---------------------------------------------------------------- builder ---
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# 1. Dependencies only. This layer is rebuilt when Cargo.toml or Cargo.lock
#    change, not when the sources do. The manifest also declares an example
#    (loadtest/limiter_memory.rs) and the integration test target
#    (tests/it/main.rs): stand-ins for them are created so the manifest is
#    complete, but only the `seckill` binary is built.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src loadtest tests/it \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > loadtest/limiter_memory.rs \
 && echo 'fn main() {}' > tests/it/main.rs \
 && cargo build --release --locked --bin seckill \
 && rm -rf src target/release/seckill target/release/deps/seckill-* \
           target/release/deps/libseckill-* target/release/.fingerprint/seckill-*

# 2. The crate itself. `lua/`, `web/` (the pages) and `docs/openapi.json`
#    (include_str!) and `migrations/` (sqlx::migrate!) are compiled into the
#    binary, so they are needed here and nowhere at run time. The fingerprints of the stand-in crate were
#    removed above, so cargo cannot mistake the real sources for the dummies.
COPY src ./src
COPY lua ./lua
COPY migrations ./migrations
COPY web ./web
COPY docs/openapi.json ./docs/openapi.json
RUN cargo build --release --locked --bin seckill \
 && install -D -m 0755 target/release/seckill /out/seckill

# ---------------------------------------------------------------- runtime ---
FROM debian:bookworm-slim AS runtime

# ca-certificates for TLS endpoints a deployment may add; nothing else is
# needed (the binary has no TLS or OpenSSL dependency and links only glibc).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 seckill \
 && useradd --system --uid 10001 --gid seckill --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin seckill

COPY --from=builder /out/seckill /usr/local/bin/seckill

# Numeric, so orchestrators can verify runAsNonRoot.
USER 10001:10001

# Inside a container the gateway must listen on every interface (the default
# 127.0.0.1:8080 would be unreachable from nginx and Prometheus).
ENV SECKILL_LISTEN=0.0.0.0:8080
EXPOSE 8080

# No HEALTHCHECK here: the same image runs `seckill worker`, which has no HTTP
# listener, and the slim base has no curl. docker-compose.yml gives the
# gateways a healthcheck on GET /health written with bash's /dev/tcp.

# seckill handles SIGTERM itself (stops accepting, drains in-flight requests
# within SECKILL_SHUTDOWN_GRACE_MS, lets workers finish their batch), so it
# runs as PID 1 directly; give it a stop timeout above that grace period.
ENTRYPOINT ["seckill"]
CMD ["serve"]
