#!/bin/sh
# Key stores for docker-compose.yml, as `qsfraud demo` makes them: one per retailer, the
# aggregator and an admin, then the trust each needs (the aggregator trusts the retailers; the
# retailers trust the aggregator and the admin, the admin the retailers), and the
# watchlist's consortium key sealed to each retailer. Idempotent: existing stores are kept.
# In production each party runs `keys init` on its own machine and only the public bundles
# (`keys show --export`) travel; one container doing all of it is for trying the system out.
set -eu
KEYS=${QSFRAUD_KEYS_ROOT:-/app/.qsfraud/keys}
RETAILERS=${QSFRAUD_RETAILERS:-"acme globex initech"}

init() {  # name role
  if [ ! -f "$KEYS/$1/identity.json" ]; then
    qsfraud keys init --dir "$KEYS/$1" --name "$1" --role "$2" >/dev/null
  fi
  qsfraud keys show --dir "$KEYS/$1" --export "$KEYS/$1.pub.json" >/dev/null
}

for r in $RETAILERS; do init "$r" retailer; done
init aggregator aggregator
init admin admin
for r in $RETAILERS; do
  qsfraud keys trust --dir "$KEYS/aggregator" "$KEYS/$r.pub.json" >/dev/null
  qsfraud keys trust --dir "$KEYS/$r" "$KEYS/aggregator.pub.json" >/dev/null
  qsfraud keys trust --dir "$KEYS/$r" "$KEYS/admin.pub.json" >/dev/null
  qsfraud keys trust --dir "$KEYS/admin" "$KEYS/$r.pub.json" >/dev/null
done
# the federated watchlist's consortium key, sealed by the admin to each retailer; when one
# lacks its copy (a new retailer), every retailer gets a new key: one key for all of them
copies=""
missing=""
for r in $RETAILERS; do
  copies="$copies $r=$KEYS/$r/watch-key.sealed"
  if [ ! -f "$KEYS/$r/watch-key.sealed" ]; then missing=yes; fi
done
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  qsfraud watch-key --admin "$KEYS/admin" $copies >/dev/null
fi
echo "key stores ready in $KEYS"
