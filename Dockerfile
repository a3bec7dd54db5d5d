# syntax=docker/dockerfile:1
#
# convocore-gateway container image.
#
#   docker build -t convocore-gateway:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e CONVOCORE_API_TOKEN=... \
#     -v "$PWD/idp.pem:/etc/convocore-gateway/keys/idp.pem:ro" convocore-gateway:0.1.0
#
# The binary links glibc (and aws-lc through aws-lc-rs), so it is built on Debian bookworm and
# runs on distroless `cc` for bookworm: the same glibc, plus libgcc and CA certificates, no
# shell, no package manager. The Helm chart in charts/convocore-gateway runs this image.

# The toolchain CI uses (README: stable, 1.88 or newer).
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole source tree (less what .dockerignore leaves out): Cargo checks that every target
# Cargo.toml declares (benches, examples, tests) exists, even for a build of the binary.
COPY . .
# The release build CI and the README describe, from the committed Cargo.lock. The target
# folder is a build cache, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/convocore-gateway /out/convocore-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="convocore-gateway" \
      org.opencontainers.image.description="Caching API gateway for Convocore V3 conversation exports" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/convocore-gateway /usr/local/bin/convocore-gateway
# The commented production config; its relative *_file paths resolve against
# /etc/convocore-gateway/. The chart mounts its own config and passes --config.
COPY config.toml /etc/convocore-gateway/config.toml
ENV CONVOCORE_GATEWAY_CONFIG=/etc/convocore-gateway/config.toml
# distroless's `nonroot` user (65532:65532), as the chart's securityContext expects.
USER 65532:65532
# API, admin (/metrics, /healthz, /readyz).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/convocore-gateway"]
