#!/usr/bin/env bash
# The cluster test (README, "Run it as a cluster"): the services as containers of the image
# deploy/image.sh builds, on a private Docker network of their own, as a cluster would run
# them: two muses behind the network alias `muse`, one majordomo, a PostgreSQL store (a
# throwaway server from deploy/postgres.sh on the network's gateway), and two orchestrators A
# and B on that store that find their replicas by DNS (--muse dns://muse:50051). Then, each a
# step with one line saying what was done and how the system answered:
#
#   turns              two turns of one session through A's HTTP API
#   lease              a turn of that session sent to A and to B at once: they never run together
#   kill-muse          the muse serving a turn killed mid-turn: the turn fails over and completes
#   stop-orchestrator  A stopped: B continues the session, its transcript intact
#   disconnect         the muse serving a turn cut off the network mid-turn: the turn completes
#   rejoin             that muse connected again: it is found again and serves a turn
#   scale              a third muse started under the alias: it is found and serves a turn
#
# Ends with one summary line; exits non-zero on any failure, after printing the containers'
# logs. Containers, network and PostgreSQL go away in any case. Every wait has a deadline.
#
#   deploy/cluster-test.sh        needs Docker, python3, Debian's postgresql (postgres.sh installs it)
#   CLUSTER_TEST_LOGS=DIR         keeps every container's whole log there
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

steps=(turns lease kill-muse stop-orchestrator disconnect rejoin scale)
id="mmct-$$-$RANDOM"          # names the run's network, containers and database directory
net="$id"
hub="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
pg_dir="/var/tmp/$id-postgres" # not under /root: the postgres user must enter it
pg_port=""
passed=()
step=files
t_start=$SECONDS

say() { echo "cluster-test: $*"; }
joined() { if (($#)); then printf '%s, ' "$@" | sed 's/, $//'; else echo none; fi; }
fail() {
    say "$step: FAIL: $*" >&2
    exit 1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local cs
    cs="$(docker ps -aq --filter "label=mm.cluster-test=$id" 2>/dev/null || true)"
    if [[ -n "${CLUSTER_TEST_LOGS:-}" ]]; then
        mkdir -p "$CLUSTER_TEST_LOGS"
        for c in $cs; do
            docker logs "$c" >"$CLUSTER_TEST_LOGS/$(docker inspect -f '{{.Name}}' "$c" | sed "s|^/$id-||").log" 2>&1 || true
        done
    fi
    if ((rc != 0)); then
        # The evidence, before it goes: each container's last lines, the store's log.
        for c in $cs; do
            echo "----- $(docker inspect -f '{{.Name}} ({{.State.Status}})' "$c" | sed 's|^/||')" >&2
            docker logs --tail 25 "$c" 2>&1 | sed 's/^/  /' >&2 || true
        done
        if [[ -f "$pg_dir/server.log" ]]; then
            echo "----- postgres" >&2
            tail -n 15 "$pg_dir/server.log" | sed 's/^/  /' >&2 || true
        fi
        local why=""
        ((rc != 130)) || why=", interrupted"
        say "FAIL ${#passed[@]}/${#steps[@]} at $step$why after $((SECONDS - t_start)) s (passed: $(joined "${passed[@]}"))"
    fi
    [[ -z "$cs" ]] || docker rm -f $cs >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
    if [[ -n "$pg_port" ]]; then
        PG_PORT="$pg_port" PG_DIR="$pg_dir" bash deploy/postgres.sh stop >/dev/null 2>&1 || true
    fi
    rm -rf "$pg_dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls `cmd` every half second until it succeeds; fails the step after `secs` seconds.
wait_for() {
    local what="$1" secs="$2"
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || fail "no $what within $secs s"
        sleep 0.5
    done
}

# Evaluates a Python expression over the JSON in $1 (as `v`); strings print bare.
jx() {
    python3 -c 'import json, sys; v = json.loads(sys.argv[1]); r = eval(sys.argv[2]); print(r if isinstance(r, str) else json.dumps(r))' "$1" "$2"
}

# Turns over the HTTP API, streamed and at once: `turns SPEC…`, each SPEC `BASE|SESSION|MESSAGE`
# (SESSION `-`: a new session). Prints a JSON list, one object per turn: its session, the muse
# that started it (the `started` event's muse_replica, and its container), failovers, reply,
# finish reason, error, times. With CT_HOOK set, a turn runs it once when its muse starts
# dreaming (the first latent step), `{name}` being that muse's container: that is how a muse
# is killed or cut off mid-turn. CT_NAMES maps addresses to containers.
TURN_PY='
import json, os, subprocess, sys, threading, time, urllib.error, urllib.request
names = json.loads(os.environ.get("CT_NAMES", "{}"))
hook = os.environ.get("CT_HOOK", "")
tokens = int(os.environ.get("CT_TOKENS", "24"))
def name(endpoint):
    return names.get(endpoint.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]"), endpoint)
def turn(spec, r):
    base, session, message = spec.split("|", 2)
    r.update(session=None, muse=None, muse_name=None, failovers=[], reply="", finish=None,
             error=None, hooked=None, t_started=None, t_end=None)
    body = {"messages": [{"role": "user", "content": message}], "stream": True,
            "max_tokens": tokens, "dream": {"max_attempts": 1}}
    headers = {"content-type": "application/json"}
    if session != "-":
        headers["x-session-id"] = session
    try:
        req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=150) as resp:
            r["session"] = resp.headers.get("x-session-id")
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                c = json.loads(line[6:])
                if "error" in c:
                    r["error"] = c["error"].get("message")
                    break
                d = c.get("x_dream") or {}
                kind = d.get("type")
                if kind == "started":
                    r.update(muse=d["muse_replica"], muse_name=name(d["muse_replica"]), t_started=time.time())
                elif kind == "failover":
                    r["failovers"].append({"from": name(d["from"]), "to": name(d["to"]) if d["to"] else "",
                                           "reason": " ".join(d["reason"].split())[:100]})
                elif kind == "latent_step" and hook and r["hooked"] is None and r["muse"]:
                    r["hooked"] = r["muse_name"]
                    subprocess.run(hook.format(name=r["muse_name"]), shell=True, timeout=60,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for ch in c.get("choices", []):
                    r["reply"] += ch.get("delta", {}).get("content") or ""
                    r["finish"] = ch.get("finish_reason") or r["finish"]
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        try:
            body = json.loads(body)["error"]["message"]
        except Exception:
            pass
        r["error"] = "HTTP %d: %s" % (e.code, body[:160])
    except Exception as e:
        r["error"] = repr(e)[:160]
    r["t_end"] = time.time()
results = [{} for _ in sys.argv[1:]]
threads = [threading.Thread(target=turn, args=a) for a in zip(sys.argv[1:], results)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
'
turns() { python3 -c "$TURN_PY" "$@"; }

# Every running container's address on the network, as {"IP": "name"}.
names() {
    local c
    for c in $(docker ps -q --filter "label=mm.cluster-test=$id"); do
        docker inspect -f "{{.Name}} {{with index .NetworkSettings.Networks \"$net\"}}{{.IPAddress}}{{end}}" "$c"
    done | python3 -c 'import json, sys; print(json.dumps({l.split()[1]: l.split()[0].lstrip("/") for l in sys.stdin if len(l.split()) == 2}))'
}
ip_of() { docker inspect -f "{{with index .NetworkSettings.Networks \"$net\"}}{{.IPAddress}}{{end}}" "$1"; }
short() { echo "${1#"$id"-}"; }
# A reply, shortened for one line.
clip() {
    local s="${1//$'\n'/ }"
    ((${#s} <= 40)) || s="${s:0:40}…"
    printf '"%s"' "$s"
}
# Fails the step unless every turn in the JSON list $1 ended with a reply and no error.
all_replied() {
    local bad
    bad="$(jx "$1" '"; ".join("%s: %s" % (r["muse_name"], r["error"] or "no reply (finish %s)" % r["finish"]) for r in v if r["error"] or not r["finish"] or not r["reply"])')"
    [[ -z "$bad" ]] || fail "a turn did not complete: $bad"
}
# The number of `role` replicas orchestrator $1 knows (mm_replicas on /metrics).
replicas() { curl -sf --max-time 5 "$1/metrics" | awk -v m="mm_replicas{role=\"$2\"}" '$1 == m {print $2}'; }
replicas_are() { [[ "$(replicas "$1" "$2")" == "$3" ]]; }
# Session $2 as "index|user|reply" lines, from orchestrator $1's API.
transcript() {
    curl -sf --max-time 10 "$1/api/sessions/$2" |
        python3 -c 'import json, sys; [print(("%s|%s|%s" % (t["index"], t["user"], t["reply"])).replace("\n", " ")) for t in json.load(sys.stdin)["turns"]]'
}
serves_models() { curl -sf --max-time 5 "$1/v1/models" | grep -q '"muse='; }
# Rounds of $2 new-session turns at once through orchestrator $3 until muse container $1 starts
# one (the least loaded replica takes each call, so N turns at once reach N replicas); prints
# "rounds|muses that served the last round".
until_serves() {
    local want="$1" n="$2" via="$3" end=$((SECONDS + $4)) rounds=0 r served specs=()
    for ((i = 0; i < n; i++)); do specs+=("$via|-|Say something about rivers."); done
    while :; do
        CT_NAMES="$(names)"
        rounds=$((rounds + 1))
        r="$(turns "${specs[@]}")"
        all_replied "$r"
        served="$(jx "$r" '", ".join(sorted(set(x["muse_name"] for x in v)))')"
        [[ ", $served, " == *", $want, "* ]] && break
        ((SECONDS < end)) || fail "$(short "$want") started no turn in $rounds rounds of $n (served: $served)"
    done
    echo "$rounds|${served//$id-/}"
}

docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info): the cluster test runs the services as containers"

# --- the deployment files: compose's model, and the Kubernetes manifests against the API's
# JSON schemas (there is no cluster here: they are checked, not applied) --------------------
compose=(docker compose)
docker compose version >/dev/null 2>&1 || compose=(docker-compose)
MM_API_TOKEN=cluster-test-token POSTGRES_PASSWORD=cluster-test "${compose[@]}" -f deploy/compose.yaml config -q ||
    fail "deploy/compose.yaml does not validate"
# kubernetes-validate carries the schemas (offline): a cached venv, installed once.
k8s_venv="${XDG_CACHE_HOME:-$HOME/.cache}/mm/k8s-validate"
k8s_want="kubernetes-validate==1.37.0"
(
    mkdir -p "$(dirname "$k8s_venv")"
    exec 9>"$k8s_venv.lock"
    flock 9
    if [[ "$(cat "$k8s_venv/.mm-installed" 2>/dev/null)" != "$k8s_want" ]]; then
        python3 -m venv "$k8s_venv"
        "$k8s_venv/bin/pip" install --quiet --disable-pip-version-check "$k8s_want"
        echo "$k8s_want" >"$k8s_venv/.mm-installed"
    fi
) >&2
"$k8s_venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml >&2 ||
    fail "the Kubernetes manifests do not validate"
say "files: ok: deploy/compose.yaml (${compose[*]} config), $(cat deploy/k8s/*.yaml | grep -c '^kind:') resources in deploy/k8s/ against the Kubernetes schemas (kubernetes-validate ${k8s_want#*==}, strict)"

# --- setup -------------------------------------------------------------------------------
step=setup
image="$(bash deploy/image.sh)"
# The models stay on the host, mounted read-only.
python3 deploy/fetch_models.py smollm2-135m >/dev/null 2>"/tmp/$id-fetch.err" ||
    { cat "/tmp/$id-fetch.err" >&2; rm -f "/tmp/$id-fetch.err"; fail "the default model could not be fetched"; }
rm -f "/tmp/$id-fetch.err"
docker network create --label "mm.cluster-test=$id" "$net" >/dev/null
read -r subnet gateway < <(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}' "$net")
# PostgreSQL on the host, reachable from this network only (its gateway address and subnet).
pg_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
pg_url="$(PG_PORT="$pg_port" PG_DIR="$pg_dir" PG_LISTEN="127.0.0.1,$gateway" PG_HBA="$subnet" bash deploy/postgres.sh 2>"$pg_dir.err")" ||
    { cat "$pg_dir.err" >&2; rm -f "$pg_dir.err"; fail "PostgreSQL did not start"; }
rm -f "$pg_dir.err"
store="${pg_url/127.0.0.1/$gateway}"

run() { # run NAME DOCKER-ARGS…: a container of this run
    local name="$1"
    shift
    docker run -d --name "$id-$name" --label "mm.cluster-test=$id" --network "$net" \
        -v "$hub:/hf/hub:ro" "$@" >/dev/null
}
start_muse() { run "muse-$1" --network-alias muse "$image" muse serve --listen 0.0.0.0:50051; }
start_orchestrator() {
    run "orchestrator-$1" "$image" mm serve --listen 0.0.0.0:50050 --http 0.0.0.0:50080 \
        --store "$store" --muse dns://muse:50051 --majordomo dns://majordomo:50052
}
start_muse 1
start_muse 2
run majordomo --network-alias majordomo "$image" majordomo serve --listen 0.0.0.0:50052
start_orchestrator a
start_orchestrator b
A="http://$(ip_of "$id-orchestrator-a"):50080"
B="http://$(ip_of "$id-orchestrator-b"):50080"
wait_for "model pair served by orchestrator A" 120 serves_models "$A"
wait_for "model pair served by orchestrator B" 60 serves_models "$B"
wait_for "2 muse replicas known to A" 30 replicas_are "$A" muse 2
say "setup: ok ($((SECONDS - t_start)) s): 2 muses, a majordomo, orchestrators A and B on ${store%%@*}@…:$pg_port, network $net ($subnet)"

begin() {
    step="$1"
    t_step=$SECONDS
}
pass() {
    passed+=("$step")
    say "$step: ok ($((SECONDS - t_step)) s): $*"
}

# --- turns: a session over the HTTP API --------------------------------------------------
begin turns
export CT_NAMES
CT_NAMES="$(names)"
r1="$(turns "$A|-|Write a haiku about the sea.")"
all_replied "$r1"
session="$(jx "$r1" 'v[0]["session"] or ""')"
[[ -n "$session" ]] || fail "the response named no session (X-Session-Id)"
r2="$(turns "$A|$session|Now one about the moon.")"
all_replied "$r2"
[[ "$(jx "$r2" 'v[0]["session"]')" == "$session" ]] || fail "X-Session-Id $session came back as $(jx "$r2" 'v[0]["session"]')"
n="$(transcript "$A" "$session" | wc -l)"
((n == 2)) || fail "session $session holds $n turns, not 2"
pass "session ${session:0:8}: 2 turns through A, started on $(short "$(jx "$r1" 'v[0]["muse_name"]')") and $(short "$(jx "$r2" 'v[0]["muse_name"]')"); replies $(clip "$(jx "$r1" 'v[0]["reply"]')"), $(clip "$(jx "$r2" 'v[0]["reply"]')")"

# --- lease: one turn of a session at a time, across orchestrators --------------------------
begin lease
n0="$(transcript "$A" "$session" | wc -l)"
r="$(turns "$A|$session|A line about rain." "$B|$session|A line about snow.")"
n1="$(transcript "$A" "$session" | wc -l)"
outcome="$(jx "$r" '(
"overlap" if all(not x["error"] for x in v) and v[0]["t_started"] < v[1]["t_end"] and v[1]["t_started"] < v[0]["t_end"]
else "serial" if all(not x["error"] for x in v)
else "refused-%s" % ("AB"[[bool(x["error"]) for x in v].index(True)]) if sum(bool(x["error"]) for x in v) == 1 and "409" in "".join(x["error"] or "" for x in v)
else "failed: " + "; ".join(x["error"] or "ok" for x in v))')"
case "$outcome" in
refused-?)
    ((n1 == n0 + 1)) || fail "one turn was refused, yet the session went from $n0 to $n1 turns"
    pass "a turn of the session sent to A and B at once: ${outcome#refused-} answered $(jx "$r" '[x["error"] for x in v if x["error"]][0][:90]')…; the other ran; $n0 → $n1 turns"
    ;;
serial)
    ((n1 == n0 + 2)) || fail "both turns ran, yet the session went from $n0 to $n1 turns"
    pass "a turn of the session sent to A and B at once: one waited for the other; $n0 → $n1 turns"
    ;;
*) fail "turns of one session sent to A and B at once: $outcome" ;;
esac

# --- kill-muse: the serving muse killed mid-turn -----------------------------------------
begin kill-muse
CT_NAMES="$(names)"
r="$(CT_TOKENS=96 CT_HOOK='docker kill {name}' turns "$A|$session|Tell me a story about a lighthouse keeper.")"
killed="$(jx "$r" 'v[0]["hooked"] or ""')"
[[ -n "$killed" ]] || fail "the turn reached no latent step, so no muse was killed: $r"
all_replied "$r"
[[ "$(docker inspect -f '{{.State.Running}}' "$killed")" == false ]] || fail "$(short "$killed") still runs after docker kill"
fo="$(jx "$r" '"; ".join("%s → %s (%s)" % (f["from"], f["to"] or "?", f["reason"]) for f in v[0]["failovers"])')"
[[ "$(jx "$r" 'any(f["from"] == v[0]["hooked"] for f in v[0]["failovers"])')" == true ]] ||
    fail "no failover away from $(short "$killed") (failovers: ${fo:-none})"
docker start "$killed" >/dev/null # back for the next steps; wait until A has found it again
wait_for "muse replicas back to 2 on A after $(short "$killed") restarted" 60 replicas_are "$A" muse 2
pass "killed $(short "$killed") at its first latent step; failover ${fo//$id-/}; the turn completed: $(clip "$(jx "$r" 'v[0]["reply"]')"); restarted it, A knows 2 muses again"

# --- stop-orchestrator: B continues what A served -----------------------------------------
begin stop-orchestrator
before="$(transcript "$A" "$session")"
n0="$(wc -l <<<"$before")"
t=$SECONDS
docker stop -t 30 "$id-orchestrator-a" >/dev/null
stopped_in=$((SECONDS - t))
CT_NAMES="$(names)"
r="$(turns "$B|$session|And what did the keeper see at dawn?")"
all_replied "$r"
after="$(transcript "$B" "$session")"
n1="$(wc -l <<<"$after")"
[[ "$(head -n "$n0" <<<"$after")" == "$before" ]] || fail "B's transcript of the first $n0 turns differs from A's: $(diff <(echo "$before") <(head -n "$n0" <<<"$after") | head -n 4 | tr '\n' ' ')"
((n1 == n0 + 1)) || fail "B's session has $n1 turns after the turn, not $((n0 + 1))"
pass "stopped A (in $stopped_in s, exit $(docker inspect -f '{{.State.ExitCode}}' "$id-orchestrator-a")); B read session ${session:0:8} (${n0} turns, identical) and ran turn $n1 on $(short "$(jx "$r" 'v[0]["muse_name"]')"): $(clip "$(jx "$r" 'v[0]["reply"]')")"

# --- disconnect: the serving muse cut off the network mid-turn ------------------------------
begin disconnect
CT_NAMES="$(names)"
r="$(CT_TOKENS=96 CT_HOOK="docker network disconnect -f $net {name}" turns "$B|$session|Tell me about the storm that night.")"
cut="$(jx "$r" 'v[0]["hooked"] or ""')"
[[ -n "$cut" ]] || fail "the turn reached no latent step, so no muse was cut off: $r"
all_replied "$r"
fo="$(jx "$r" '"; ".join("%s → %s (%s)" % (f["from"], f["to"] or "?", f["reason"]) for f in v[0]["failovers"])')"
[[ "$(jx "$r" 'any(f["from"] == v[0]["hooked"] for f in v[0]["failovers"])')" == true ]] ||
    fail "no failover away from $(short "$cut") (failovers: ${fo:-none})"
wait_for "muse replicas down to 1 on B with $(short "$cut") cut off" 30 replicas_are "$B" muse 1
pass "cut $(short "$cut") off at its first latent step; failover ${fo//$id-/}; the turn completed in $(jx "$r" '"%.0f s" % (v[0]["t_end"] - v[0]["t_started"])'): $(clip "$(jx "$r" 'v[0]["reply"]')"); B knows 1 muse"

# --- rejoin: the cut-off muse back on the network -----------------------------------------
begin rejoin
docker network connect --alias muse "$net" "$cut"
wait_for "muse replicas back to 2 on B after $(short "$cut") reconnected" 30 replicas_are "$B" muse 2
out="$(until_serves "$cut" 2 "$B" 60)"
pass "reconnected $(short "$cut") (now $(ip_of "$cut")); B knows 2 muses; 2 turns at once started on ${out#*|} (round ${out%%|*})"

# --- scale: a third muse under the alias --------------------------------------------------
begin scale
start_muse 3
wait_for "3 muse replicas known to B" 60 replicas_are "$B" muse 3
out="$(until_serves "$id-muse-3" 3 "$B" 90)"
pass "started muse-3 ($(ip_of "$id-muse-3")) with the alias muse; B knows 3 muses; 3 turns at once started on ${out#*|} (round ${out%%|*})"

step=done
say "PASS ${#passed[@]}/${#steps[@]} ($(joined "${passed[@]}")) in $((SECONDS - t_start)) s"
