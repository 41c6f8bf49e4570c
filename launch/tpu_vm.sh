#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, install t5lite on every worker, run the same command on
# all workers (each is one JAX process; jax.distributed finds its peers), stream the logs, delete.
#
#   launch/tpu_vm.sh --name=t5-xl --zone=us-central2-b --accelerator_type=v4-32 -- \
#       python -m t5lite.train --gin_file=gin/base.gin --gin_file=gin/models/t5_1_1_xl.gin \
#       --gin.MODEL_DIR=\"gs://my-bucket/t5-xl\" --gin.TrainConfig.partitioning_preset=\"fsdp\"
#
# Options: --project=P  --version=RUNTIME (default: the TPU software version Google lists for the
# accelerator: v2-alpha-tpuv6e for v6e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e,
# tpu-ubuntu2204-base for v4 and older)  --spot  --keep (do not delete the slice at the end)
# --dry_run (print the gcloud commands, run nothing).
# Each worker gets a Python 3.11 environment in ~/t5lite-venv (launch/tpu_worker_setup.sh: the
# images' own Python 3.10 is too old for jax 0.10) and runs the command in it.
# Every worker writes its checkpoint shards, so on a multi-host slice MODEL_DIR must be storage all
# workers share (a gs:// bucket). Logs: every worker's output, prefixed "[worker-hostname]", also
# saved to ./tpu_vm-<name>.log.
set -euo pipefail

name="" zone="" accelerator_type="" project="" version="" spot=0 keep=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (the command to run goes after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" || -z "$accelerator_type" || $# -eq 0 ]]; then
  echo "usage: $0 --name=NAME --zone=ZONE --accelerator_type=TYPE [--project=P] [--version=V] [--spot] [--keep] [--dry_run] -- COMMAND..." >&2
  exit 2
fi

if [[ -z "$version" ]]; then
  case "$accelerator_type" in
    v6e-*) version="v2-alpha-tpuv6e" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
command_line="$(printf '%q ' "$@")"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
archive="/tmp/t5lite-$name.tar.gz"
log="tpu_vm-$name.log"
[[ $dry_run -eq 1 ]] && log=/dev/null

run() {  # print the command (dry run) or run it
  if [[ $dry_run -eq 1 ]]; then
    echo "${@@Q}"
  else
    "$@"
  fi
}

delete_slice() {
  run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
}

create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" --version="$version")
[[ $spot -eq 1 ]] && create+=(--spot)
run "${create[@]}"
if [[ $keep -eq 0 ]]; then
  trap delete_slice EXIT  # also when a step fails or the run is interrupted
fi

# The committed tree, installed identically on every worker.
run git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
run "${gcloud_tpu[@]}" scp "$archive" "$name:t5lite.tar.gz" "${where[@]}" --worker=all
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="rm -rf t5lite && mkdir t5lite && tar xzf t5lite.tar.gz -C t5lite && cd t5lite && bash launch/tpu_worker_setup.sh"

# The same command on all workers; each line prefixed with its worker's hostname.
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
  --command="cd t5lite && . ~/t5lite-venv/bin/activate && $command_line 2>&1 | sed -u \"s/^/[\$(hostname)] /\"" | tee "$log"
