# Both gateway binaries in one small image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gateway-api /src/target/release/gateway-worker /usr/local/bin/
RUN useradd --create-home gateway && mkdir -p /data && chown gateway /data
USER gateway
EXPOSE 8000
CMD ["gateway-api"]
