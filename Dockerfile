# The rxledger GraphQL gateway. Built and run by docker-compose.yml (with a MongoDB replica set).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The image is for deployments: production mode, which refuses to start without a signing key,
# token verification keys, RXLEDGER_JWT_ISSUER and RXLEDGER_JWT_AUDIENCE (no development fallbacks).
ENV RXLEDGER_MODE=production

# Build context is filtered by .dockerignore (no .venv, var/, .git, caches).
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src

# Run unprivileged. Compose bind-mounts file secrets with the host file's owner and mode, so the
# signing key (mode 0600) must be readable by this uid: see docker-compose.yml.
RUN groupadd --system --gid 10001 rxledger \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /srv/rxledger rxledger
USER 10001:10001
WORKDIR /srv/rxledger
# Mount points of docker-compose.yml's named volumes: a new volume takes the owner of the
# directory it is mounted on, so the mirror and the witness can write theirs.
RUN mkdir /srv/rxledger/mirror /srv/rxledger/witness

EXPOSE 8000
# One gateway process per core the container may use (RXLEDGER_WORKERS overrides it); the
# rxledger process is PID 1 and stops them all on the SIGTERM of `docker stop`.
CMD ["rxledger", "serve", "--host", "0.0.0.0", "--port", "8000"]
