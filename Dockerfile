# Ledger: a multi-stage build. `docker compose up` uses it (see docker-compose.yml).
#
#   build    Swift toolchain + libpq-dev: compiles `ledger` in release mode.
#   test     build + psql and a Python venv with pytest: runs scripts/test against the compose PostgreSQL (profile `integration`).
#   runtime  Debian slim with libpq5 only: the `ledger` binary, its resources and sql/.

FROM swift:6.2-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Resolve first, so that dependency downloads stay cached while sources change.
COPY Package.swift ./
RUN mkdir -p Sources Tests && swift package resolve || true
COPY Sources ./Sources
COPY Tests ./Tests
RUN swift build -c release --product ledger --static-swift-stdlib \
 && mkdir -p /out \
 && bin="$(swift build -c release --show-bin-path)" \
 && cp "$bin/ledger" /out/ \
 && cp -R "$bin"/*.resources /out/

FROM build AS test
# The Python packages in the venv scripts/test uses (.venv-test, kept out of the build context by .dockerignore).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && /usr/bin/python3 -m venv /src/.venv-test \
 && /src/.venv-test/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
      pytest requests pyyaml openapi-spec-validator 'schemathesis>=4,<5'
COPY . /src
CMD ["scripts/test"]

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 libstdc++6 ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app ledger
WORKDIR /app
COPY --from=build /out/ /app/
COPY sql /app/sql
USER ledger
ENV HOST=0.0.0.0 \
    PORT=8080 \
    LEDGER_SQL_DIR=/app/sql
EXPOSE 8080
# SIGTERM (docker stop) shuts down gracefully: in-flight requests finish, then the pool closes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/ledger"]
CMD ["serve"]
