# Images of hive-api and hive-worker (one per binary):
#   docker build --build-arg BIN=hive-api -t hive-api .
#   docker build --build-arg BIN=hive-worker -t hive-worker .
# Built for the platform of the builder; the ECS task definitions run them as user 65534 with
# a read-only root filesystem.
FROM rust:1.95-bookworm AS build
ARG BIN
WORKDIR /src
COPY . .
# Its own package only (`-p`): the workspace's test crate turns on `hive-jobs/chaos` (fault
# injection), which a production binary must not have.
RUN cargo build --release --locked -p "${BIN}" --bin "${BIN}" && cp "target/release/${BIN}" /app

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /app /usr/local/bin/app
USER 65534
ENTRYPOINT ["/usr/local/bin/app"]
