# syntax=docker/dockerfile:1
# The ambit image: one static-enough binary for `ambit node` (the DaemonSet) and
# `ambit controlplane` (the Deployment). Build from the repository root:
#   docker build -t ghcr.io/ambit-mesh/ambit:0.1.0 .
# The eBPF programs are compiled and embedded by userspace/build.rs, with Debian's rustc and
# bpf-linker exactly as on a development machine (ARCHITECTURE.md, "Toolchains").

FROM debian:bookworm AS build
ARG RUST_VERSION=1.95.0
ARG BPF_LINKER_VERSION=0.13.0
ENV DEBIAN_FRONTEND=noninteractive
# rustc-web (Debian's rustc and library sources, for the eBPF crate) and LLVM 22 (for
# bpf-linker) come from bookworm-security.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends \
      ca-certificates curl gcc libc6-dev make pkg-config \
      rustc-web rust-web-src cargo-web llvm-22-dev zlib1g-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
RUN PATH=/usr/lib/llvm-22/bin:$PATH LLVM_PREFIX=/usr/lib/llvm-22 \
      cargo install bpf-linker --version ${BPF_LINKER_VERSION} --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ambit --bin ambit \
 && install -D -m 0755 target/release/ambit /out/ambit

FROM debian:bookworm-slim
# Nothing else: ambit needs no shell tools at run time (iproute2, iptables: none).
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ambit /usr/local/bin/ambit
# The node proxy runs as root with specific capabilities (see daemonset/); the control plane
# overrides this with a non-root user in its Deployment.
ENTRYPOINT ["/usr/local/bin/ambit"]
CMD ["--help"]
