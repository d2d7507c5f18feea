# The cloudfs images, from one build stage. Build each with its target:
#   docker build --target controller -t cloudfs-controller:0.1.0 .
#   docker build --target node       -t cloudfs-node:0.1.0 .
#   docker build --target cli        -t cloudfs:0.1.0 .
# The chart takes image names and tags from its values (image.*).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The workspace needs no system libraries: FUSE is spoken natively and the CSI protobuf is
# compiled by a Rust compiler at build time.
RUN cargo build --release --locked -p cloudfs -p cloudfs-node -p cloudfs-controller \
 && mkdir /out \
 && cp target/release/cloudfs target/release/cloudfs-node target/release/cloudfs-controller /out/

FROM debian:bookworm-slim AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The CSI controller plugin and operator: talks to Swift and the Kubernetes API only.
FROM base AS controller
COPY --from=build /out/cloudfs-controller /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudfs-controller"]

# The `cloudfs` CLI, which garbage-collection Jobs run (`cloudfs gc …`).
FROM base AS cli
COPY --from=build /out/cloudfs /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cloudfs"]

# The CSI node plugin and the mount processes it starts: root with /dev/fuse (the chart runs
# it privileged), fuse3 for fusermount3, util-linux for umount.
FROM base AS node
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/cloudfs /out/cloudfs-node /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/cloudfs-node"]
