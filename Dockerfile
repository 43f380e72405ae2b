# syntax=docker/dockerfile:1
#
# qbo-broker image. Two stages: the builder resolves the locked dependencies into a venv with
# uv, builds the project's wheel and installs it there; the runtime stage gets only that venv
# (no source tree: the wheel carries the Alembic migrations) and a non-root user.
# Both stages must use the same base image: the venv's interpreter is a symlink to
# /usr/local/bin/python3.11 of the base image.

FROM python:3.11-slim AS builder

# Pinned so every build reads uv.lock the same way.
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

# Install into /opt/venv (copied whole into the runtime stage), with the base image's Python,
# never a downloaded one. Byte-compile now so the read-only runtime never needs to.
# Copy rather than hard-link: the uv cache is a separate mount.
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-editable

# Then the project itself, as an operator installs it: build the wheel (README.md is the
# package's readme; alembic/ goes into the wheel as service/migrations) and install it. Its
# dependencies are already there at the lock's versions, so nothing else is resolved.
COPY README.md ./
COPY alembic ./alembic
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/uv \
    uv build --wheel --out-dir /dist \
    && uv pip install --python /opt/venv/bin/python --no-deps /dist/qbo_broker-*.whl


FROM python:3.11-slim AS runtime

# BROKER_DATA_DIR only matters without DATABASE_URL (embedded PostgreSQL); point it at a
# directory the service user owns instead of the read-only /app.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}" \
    BROKER_DATA_DIR=/var/lib/qbo-broker

# A fixed uid/gid so volume ownership and Kubernetes runAsUser/runAsNonRoot are predictable.
RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin broker \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/qbo-broker

# `qbo-broker serve` runs the migrations at start-up from the installed package; nothing is read
# from the working directory. The venv stays root-owned: the service user can read, not change it.
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv

USER 10001:10001

EXPOSE 8000

# No curl in the image: the standard library does the probe. urlopen raises on any non-2xx
# answer or connection error, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["qbo-broker"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
