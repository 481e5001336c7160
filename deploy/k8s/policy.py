"""keyfleet's own rules for its Kubernetes manifests, beyond schema validity.

Run by validate.sh on the rendered overlays (--whole, --region-a, --region-b) or, without
kustomize, on the base's files (--files). Prints every broken rule and exits 1 if any.
"""

import argparse
import sys

import yaml

problems = []


def check(ok, message):
    if not ok:
        problems.append(message)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def workloads(objs):
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_workload(w):
    where = name(w)
    pod = w["spec"]["template"]
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot must be true")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile RuntimeDefault")
    check(spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken must be false")
    notes = pod["metadata"].get("annotations", {})
    check(notes.get("prometheus.io/scrape") == "true", f"{where}: prometheus.io/scrape annotation")
    ports = {}
    for c in spec["containers"]:
        cw = f"{where} container {c['name']}"
        ports.update({p["name"]: p["containerPort"] for p in c.get("ports", [])})
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem must be true")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false")
        check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cw}: runAsNonRoot")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cw}: capabilities.drop ALL")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                check(r in res.get(kind, {}), f"{cw}: resources.{kind}.{r}")
        for probe in ("readinessProbe", "livenessProbe"):
            check("grpc" in c.get(probe, {}), f"{cw}: {probe} must use the gRPC health service")
        check(not c["image"].endswith(":latest") and ":" in c["image"], f"{cw}: pin the image tag")
    check(str(notes.get("prometheus.io/port")) in {str(p) for p in ports.values()},
          f"{where}: prometheus.io/port must be a container port")
    return ports


def check_objects(objs, complete):
    """Rules for any set of objects; `complete` when it is a whole rendering (references resolve)."""
    pods = {}
    for w in workloads(objs):
        ports = check_workload(w)
        pods[name(w)] = (w["spec"]["template"]["metadata"].get("labels", {}), ports)
    for o in objs:
        kind = o["kind"]
        if kind == "PodDisruptionBudget":
            sel = o["spec"]["selector"]["matchLabels"]
            check(any(matches(sel, labels) for labels, _ in pods.values()) or not complete,
                  f"{name(o)}: selects no workload")
        if kind == "Service":
            sel = o["spec"]["selector"]
            hits = [ports for labels, ports in pods.values() if matches(sel, labels)]
            check(hits or not complete, f"{name(o)}: selects no workload")
            for p in o["spec"]["ports"]:
                check(all(p["targetPort"] in ports for ports in hits), f"{name(o)}: targetPort {p['targetPort']} unknown")
        if kind == "HorizontalPodAutoscaler":
            ref = o["spec"]["scaleTargetRef"]
            target = [w for w in workloads(objs) if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]]
            check(target or not complete, f"{name(o)}: targets no workload")
            for w in target:
                check("replicas" not in w["spec"], f"{name(w)}: leave replicas to the HorizontalPodAutoscaler")
            check(o["spec"]["minReplicas"] >= 2, f"{name(o)}: minReplicas >= 2")
        if kind == "StatefulSet":
            check(o["spec"].get("replicas") == 1, f"{name(o)}: the authority runs exactly one replica")
            check(o["spec"].get("volumeClaimTemplates"), f"{name(o)}: the key ring needs a PersistentVolumeClaim")
    if complete:
        have = {(o["kind"], o["metadata"]["name"]) for o in objs}
        for w in workloads(objs):
            spec = w["spec"]["template"]["spec"]
            for c in spec["containers"]:
                for ref in c.get("envFrom", []):
                    if "configMapRef" in ref:
                        check(("ConfigMap", ref["configMapRef"]["name"]) in have,
                              f"{name(w)}: ConfigMap {ref['configMapRef']['name']} missing")
            for v in spec.get("volumes", []):
                if "secret" in v:
                    check(("Secret", v["secret"]["secretName"]) in have,
                          f"{name(w)}: Secret {v['secret']['secretName']} missing")


def config(objs, prefix):
    maps = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)]
    check(len(maps) == 1, f"one ConfigMap {prefix}*")
    return maps[0].get("data", {}) if maps else {}


def truthy(value):
    """As clap reads a flag's variable: anything but a false literal is true."""
    return value is not None and value.strip().lower() not in ("", "n", "no", "f", "false", "off", "0")


def component(w):
    return w["spec"]["template"]["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def environment(objs, w):
    """The KEYFLEET_* environment of a workload's first container as the kubelet builds it: its
    envFrom ConfigMaps in order (a later source wins), then its literal env values."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    c = w["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for ref in c.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(maps.get(ref["configMapRef"]["name"], {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def check_relay(objs, region, with_authority):
    """A region's relay (`verifier --serve-watch`): the region's verifiers follow it, it follows
    the authority (region a's, across regions, where there is none here)."""
    relays = [w for w in workloads(objs) if component(w) == "relay"]
    check(len(relays) == 1, f"{region}: one relay Deployment expected, found {len(relays)}")
    if not relays:
        return
    relay = relays[0]
    where = f"{region}: {name(relay)}"
    check(relay["kind"] == "Deployment" and relay["spec"].get("replicas", 1) >= 2,
          f"{where}: a Deployment of at least 2 replicas (one may be drained while the other feeds the region)")
    labels = relay["spec"]["template"]["metadata"].get("labels", {})
    check(any(o["kind"] == "PodDisruptionBudget" and matches(o["spec"]["selector"]["matchLabels"], labels)
              for o in objs), f"{where}: no PodDisruptionBudget")
    services = [o for o in objs if o["kind"] == "Service" and matches(o["spec"].get("selector", {}), labels)
                and o["spec"].get("clusterIP") != "None"]
    check(len(services) == 1, f"{where}: one ClusterIP Service expected, found {len(services)}")
    ports = [p["port"] for svc in services for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    env = environment(objs, relay)
    check(truthy(env.get("KEYFLEET_SERVE_WATCH")), f"{where}: KEYFLEET_SERVE_WATCH must be true")
    upstream = env.get("KEYFLEET_AUTHORITY", "")
    if with_authority:
        check(upstream == "http://keyfleet-authority:7000",
              f"{where}: the relay must follow the local authority, not {upstream!r}")
    else:
        check(upstream and "keyfleet-authority:" not in upstream and "keyfleet-relay" not in upstream,
              f"{where}: the relay must follow region a's authority (not a local one, not itself), not {upstream!r}")
    # The region's verifiers follow the relay's Service, and do not relay themselves.
    wanted = {f"http://{svc['metadata']['name']}:{port}" for svc in services for port in ports}
    for w in workloads(objs):
        if component(w) != "verifier":
            continue
        venv = environment(objs, w)
        check(venv.get("KEYFLEET_AUTHORITY") in wanted,
              f"{region}: {name(w)} must follow the relay ({sorted(wanted)}), not {venv.get('KEYFLEET_AUTHORITY')!r}")
        check(not truthy(venv.get("KEYFLEET_SERVE_WATCH")), f"{region}: {name(w)} must not --serve-watch")


def check_region(objs, region, with_authority):
    check_objects(objs, complete=True)
    for o in objs:
        if o["kind"] != "Namespace":
            check(o["metadata"].get("namespace") == "keyfleet", f"{region}: {name(o)} not in namespace keyfleet")
    sets = [o for o in objs if o["kind"] == "StatefulSet"]
    check(len(sets) == (1 if with_authority else 0),
          f"{region}: {'exactly one authority' if with_authority else 'no authority'} expected, found {len(sets)}")
    verifier = config(objs, "keyfleet-verifier")
    check(verifier.get("KEYFLEET_REGION") == region, f"{region}: verifiers labelled {verifier.get('KEYFLEET_REGION')}")
    # A verifier (and a relay, which reads the same ConfigMap) without an audience policy (or
    # with both) refuses to start.
    has_audience = bool(verifier.get("KEYFLEET_AUDIENCE", "").strip(", "))
    any_audience = truthy(verifier.get("KEYFLEET_ANY_AUDIENCE", "false"))
    check(has_audience != any_audience,
          f"{region}: verifiers need exactly one of KEYFLEET_AUDIENCE and KEYFLEET_ANY_AUDIENCE=true")
    if with_authority:
        secrets = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"].startswith("keyfleet-authority")]
        check(len(secrets) == 1 and set(secrets[0].get("data", {})) == {"kek", "admin-token", "node-token"},
              f"{region}: Secret keyfleet-authority with kek, admin-token and node-token")
    # Every verifier and relay sends the fleet credential (or the authority, or the relay,
    # refuses its watch stream).
    fleet = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"].startswith("keyfleet-node-token")]
    check(len(fleet) == 1 and set(fleet[0].get("data", {})) == {"node-token"},
          f"{region}: Secret keyfleet-node-token with node-token")
    for w in workloads(objs):
        if w["kind"] != "Deployment":
            continue
        for c in w["spec"]["template"]["spec"]["containers"]:
            check(any(a.startswith("--node-token-file=") for a in c.get("args", [])),
                  f"{region}: {name(w)} container {c['name']} needs --node-token-file")
    check_relay(objs, region, with_authority)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--whole")
    ap.add_argument("--region-a")
    ap.add_argument("--region-b")
    ap.add_argument("--files", nargs="*")
    args = ap.parse_args()
    count = 0
    if args.files:
        objs = [o for f in args.files for o in load(f)]
        check_objects(objs, complete=False)
        count += len(objs)
    if args.whole:
        objs = load(args.whole)
        check_objects(objs, complete=False)
        count += len(objs)
    for path, region, auth in ((args.region_a, "region-a", True), (args.region_b, "region-b", False)):
        if path:
            objs = load(path)
            check_region(objs, region, auth)
            count += len(objs)
    for p in problems:
        print(f"policy: {p}", file=sys.stderr)
    print(f"k8s: policy: {count} objects checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
