# syntax=docker/dockerfile:1
# pgtether container image: build in the Rust image, run in debian:bookworm-slim as a non-root
# user. Build: `docker build -t pgtether .` (BuildKit; the default builder since Docker 23).
# Run:   `docker run -p 6432:6432 -p 9930:9930 -v ./my.toml:/etc/pgtether/pgtether.toml:ro pgtether`
# The config file is /etc/pgtether/pgtether.toml (PGTETHER_CONFIG); the image ships
# config/docker.toml there. `docker run pgtether check` validates it.

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what `cargo build --release --bin pgtether` reads: the manifest and lock file, the sources,
# config/pgtether.toml (include_str! in src/main.rs) and benches/*.rs (the [[bench]] targets
# declared in Cargo.toml must exist for the manifest to load). tests/ is discovered, not declared,
# so it is left out. .dockerignore keeps target/ and node_modules/ out of the context.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
# The registry and target caches survive between builds; the binary is copied out of the cache
# mount, with debug info stripped (symbols stay, so panics still name functions).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release --bin pgtether \
    && strip --strip-debug target/release/pgtether -o /pgtether

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 pgtether \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pgtether
COPY --from=build /pgtether /usr/local/bin/pgtether
COPY config/docker.toml /etc/pgtether/pgtether.toml
ENV PGTETHER_CONFIG=/etc/pgtether/pgtether.toml
USER 10001:10001
# 6432: PostgreSQL clients (listen.addr); 9930: /metrics, /healthz, /readyz (http.addr).
EXPOSE 6432 9930
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgtether"]
