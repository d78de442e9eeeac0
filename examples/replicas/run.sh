#!/usr/bin/env bash
# Three mezo-serve replicas sharing one PostgreSQL database, behind nginx (nginx.conf here).
#
#   MEZO_DATABASE=postgres://mezo:secret@db-host/mezo bash examples/replicas/run.sh
#
# Each replica has its own data folder (its adapter versions on disk) and name; the database
# holds the jobs, step logs, versions (with their files), live pointers, completions and
# feedback. A job posted to any replica runs on one of them; the versions it publishes are
# served by all three within about two seconds. Stop with Ctrl-C (the replicas stop cleanly,
# handing their running job's lease to the others).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${MEZO_DATABASE:?set MEZO_DATABASE=postgres://user:password@host:port/database}"
export MEZO_DATABASE
cargo build --release -p mezo-server
mezo=target/release/mezo
"$mezo" fetch-model

pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in 1 2 3; do
    config="data/replica-$i/replica.toml"
    mkdir -p "data/replica-$i"
    printf '[server]\nreplica_name = "replica-%s"\n' "$i" > "$config"
    "$mezo" --config "$config" --data-dir "data/replica-$i" serve --port "808$i" &
    pids+=("$!")
done
echo "replicas on :8081 :8082 :8083; start nginx with examples/replicas/nginx.conf for :8080"
wait
