# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --bin pgtether

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home pgtether
COPY --from=build /src/target/release/pgtether /usr/local/bin/pgtether
COPY config/docker.toml /etc/pgtether/pgtether.toml
USER 10001
EXPOSE 6432 9930
ENV PGTETHER_CONFIG=/etc/pgtether/pgtether.toml
ENTRYPOINT ["/usr/local/bin/pgtether"]
