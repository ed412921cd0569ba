#!/bin/sh
# Installs pg_dump/pg_restore/psql of one PostgreSQL major version (the server's) into the image.
# Debian's own archive is used when it carries that major (trixie: 17); otherwise the PostgreSQL
# project's apt repository is enabled with Debian's own helper script from postgresql-common.
set -eu
major=${1:?usage: install-pg-client.sh PG_MAJOR}
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! apt-cache show "postgresql-client-$major" >/dev/null 2>&1; then
  echo "postgresql-client-$major is not in this Debian release; enabling apt.postgresql.org" >&2
  apt-get install -y -qq --no-install-recommends postgresql-common ca-certificates >/dev/null
  /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y >/dev/null
fi
apt-get install -y -qq --no-install-recommends "postgresql-client-$major" >/dev/null
rm -rf /var/lib/apt/lists/*
test -x "/usr/lib/postgresql/$major/bin/pg_dump"
"/usr/lib/postgresql/$major/bin/pg_dump" --version
