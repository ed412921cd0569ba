#!/bin/sh
# Installs pg_dump/pg_restore/psql of one PostgreSQL major version (the server's) into the image;
# with --server also postgres/pg_ctl (for the PITR drill), rsync (for `barman recover`) and file
# (Barman runs it on every WAL segment it archives, to tell encrypted ones), and
# no cluster: Debian's package would otherwise create and start one.
# Debian's own archive is used when it carries that major (trixie: 17); otherwise the PostgreSQL
# project's apt repository is enabled with Debian's own helper script from postgresql-common.
set -eu
major=${1:?usage: install-pg-client.sh PG_MAJOR [--server]}
packages="postgresql-client-$major"
if [ "${2:-}" = "--server" ]; then
  packages="$packages postgresql-$major rsync file"
  mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! apt-cache show "postgresql-client-$major" >/dev/null 2>&1; then
  echo "postgresql-client-$major is not in this Debian release; enabling apt.postgresql.org" >&2
  apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold postgresql-common ca-certificates >/dev/null
  /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y >/dev/null
fi
# shellcheck disable=SC2086 # a list of package names
apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold $packages >/dev/null
rm -rf /var/lib/apt/lists/*
test -x "/usr/lib/postgresql/$major/bin/pg_dump"
"/usr/lib/postgresql/$major/bin/pg_dump" --version
if [ "${2:-}" = "--server" ]; then
  "/usr/lib/postgresql/$major/bin/postgres" --version
  rsync --version | head -1
fi
