#!/usr/bin/env bash
# kind end to end: a throw-away kind cluster with the pinned platform (KFP standalone, Training
# Operator v1, Kubeflow Trainer v2 with its runtimes, Katib), kubetrain's manifests and images;
# the standalone training PyTorchJob must succeed, and the pipeline, compiled by `kubetrain
# compile` and submitted with the `kfp` CLI, must succeed and promote its model (its train step
# finds TrainJob served: cluster.training_api auto picks it). The cluster is deleted at the end
# (KEEP_CLUSTER=1 keeps it).
#
# Needs: docker (engine running), kind, kubectl, and kubetrain + kfp on PATH (`make kind-e2e`
# puts the project's venv first). Network access to github.com and the image registries the
# platform pulls from. Images come from `make images` (built here unless SKIP_BUILD=1).
#
# Env: CLUSTER (kubetrain-e2e), KIND_NODE_IMAGE (kindest/node:v1.32.2), RUN_TIMEOUT (3600 s),
#      PLATFORM_TIMEOUT (1200 s), KFP_PORT (8888), KEEP_CLUSTER, SKIP_BUILD.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

cluster="${CLUSTER:-kubetrain-e2e}"
node_image="${KIND_NODE_IMAGE:-kindest/node:v1.32.2}"
run_timeout="${RUN_TIMEOUT:-3600}"
platform_timeout="${PLATFORM_TIMEOUT:-1200}"
port="${KFP_PORT:-8888}"
work="$(mktemp -d "${TMPDIR:-/tmp}/kubetrain-e2e.XXXXXX")"
ctx="kind-$cluster"
k() { kubectl --context "$ctx" "$@"; }
step() { echo "[kind-e2e] $(date +%H:%M:%S) $*"; }
fail() {
  echo "[kind-e2e] FAILED: $*" >&2
  exit 1
}

for tool in docker kind kubectl kubetrain kfp; do
  command -v "$tool" >/dev/null || fail "$tool is not on PATH"
done
docker info >/dev/null 2>&1 || fail "no Docker engine answers (scripts/dockerd.sh starts one)"

version="$(python3 -c 'import kubetrain; print(kubetrain.__version__)' 2>/dev/null ||
  kubetrain --version | awk '{print $2}')"
image="$(python3 -c 'from kubetrain.launch.image import runtime_image; print(runtime_image())' 2>/dev/null ||
  echo "ghcr.io/kubetrain/kubetrain-runtime:$version")"

pf_pid=""
cleanup() {
  rc=$?
  if [ -n "$pf_pid" ]; then kill "$pf_pid" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ]; then
    echo "[kind-e2e] diagnostics:" >&2
    k get pods -A -o wide >&2 2>/dev/null || true
    k -n kubetrain get pytorchjobs -o yaml 2>/dev/null | tail -40 >&2 || true
    cat "$work/port-forward.log" >&2 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    step "keeping cluster $cluster (kind delete cluster --name $cluster)"
  else
    step "deleting cluster $cluster"
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "building images"
  images/build.sh runtime
fi
docker image inspect "$image" >/dev/null 2>&1 || fail "image $image not built (make images)"

step "creating cluster $cluster ($node_image)"
kind create cluster --name "$cluster" --image "$node_image" --wait 180s

step "installing the platform (manifests/platform, pinned releases)"
k apply -k manifests/platform/kfp-cluster-scoped
k wait --for condition=established --timeout=120s crd/applications.app.k8s.io
k apply -k manifests/platform/kfp
# The operators' CRDs exceed the client-side apply annotation limit.
k apply --server-side -k manifests/platform/training-operator
k apply --server-side -k manifests/platform/trainer
k apply --server-side -k manifests/platform/katib
k wait --for condition=established --timeout=120s crd/pytorchjobs.kubeflow.org \
  crd/experiments.kubeflow.org crd/trainjobs.trainer.kubeflow.org
# The runtimes go in once Trainer's webhook, which validates them, is up.
k -n kubeflow-system wait --for=condition=Available deployment --all --timeout="${platform_timeout}s"
k apply --server-side -k manifests/platform/trainer-runtimes
step "waiting for the platform's deployments (up to $platform_timeout s)"
k -n kubeflow wait --for=condition=Available deployment --all --timeout="${platform_timeout}s"

step "loading $image into the cluster"
kind load docker-image "$image" --name "$cluster"

step "applying manifests/overlays/kind (namespace, RBAC, claims, training job)"
k apply -k manifests/overlays/kind
step "waiting for PyTorchJob kubetrain/kubetrain-train"
k -n kubetrain wait --for=condition=Succeeded pytorchjob/kubetrain-train --timeout=1800s ||
  fail "the standalone training PyTorchJob did not succeed"

step "compiling the pipeline"
kubetrain compile -o "$work/pipeline.yaml"
grep -q "$image" "$work/pipeline.yaml" || fail "the compiled pipeline does not use $image"

step "port-forwarding the KFP API to localhost:$port"
k -n kubeflow port-forward svc/ml-pipeline "$port:8888" >"$work/port-forward.log" 2>&1 &
pf_pid=$!
endpoint="http://localhost:$port"
for _ in $(seq 60); do
  curl -fsS "$endpoint/apis/v2beta1/healthz" >/dev/null 2>&1 && break
  sleep 2
done
curl -fsS "$endpoint/apis/v2beta1/healthz" >/dev/null || fail "the KFP API does not answer"

step "submitting with the kfp CLI (waiting up to $run_timeout s)"
kfp --endpoint "$endpoint" --output json run create --experiment-name kubetrain-e2e \
  --run-name "kubetrain-e2e-$(date +%Y%m%d-%H%M%S)" --package-file "$work/pipeline.yaml" \
  --timeout "$run_timeout" >"$work/run.json"

step "checking the run"
python3 - "$work/run.json" "$endpoint" <<'PY'
import json
import sys

import kfp

run = json.load(open(sys.argv[1]))
run_id = run.get("run_id") or run.get("id")
detail = kfp.Client(host=sys.argv[2]).get_run(run_id)
state = str(detail.state)
tasks = {t.display_name: str(t.state) for t in (detail.run_details.task_details or [])}
print(f"run {run_id}: {state}")
for name, task_state in sorted(tasks.items()):
    print(f"  {name}: {task_state}")
if state != "SUCCEEDED":
    sys.exit(f"the run ended {state}")
if tasks.get("promote") != "SUCCEEDED":
    sys.exit("the model was not promoted (task 'promote' did not succeed)")
if tasks.get("reject") == "SUCCEEDED":
    sys.exit("both branches of the gate ran")
print("promoted: yes")
PY
step "PASSED"
