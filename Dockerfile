# ffwd serve in a small runtime image.
#   docker build -t ffwd .
#   docker run -p 8080:8080 -v $PWD/models:/models ffwd --model /models/lm.safetensors
# Readiness and liveness: GET /health (answers only once every model is loaded).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p ffwd-cli && strip target/release/ffwd

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 ffwd
COPY --from=build /src/target/release/ffwd /usr/local/bin/ffwd
USER ffwd
EXPOSE 8080
# listen on every interface inside the container; publish the port to choose who reaches it
ENTRYPOINT ["ffwd", "serve", "--host", "0.0.0.0", "--port", "8080"]
