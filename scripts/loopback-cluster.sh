#!/usr/bin/env bash
# Two "hosts" on this machine through the deepspeed launcher's real multi-host path (pdsh over
# ssh), on loopback addresses only: a private sshd listening on 127.0.0.2 and 127.0.0.3, started
# and stopped here by its pid, with a throwaway key in a temporary folder; a hostfile naming the
# two addresses; --master_addr 127.0.0.2 (without it the runner asks the first host for
# `hostname -I`, the machine's own interface address); gloo on `lo` through .deepspeed_env. Each
# host gets its own empty DEEPEN_HOME (sshd sets it per listening address), as with node-local
# disks. The job's completions are then compared with one process's.
#
# Needs: sshd, ssh, ssh-keygen (openssh-server, openssh-client) and pdsh, e.g.
#     apt-get update && apt-get install openssh-server pdsh
# and root (sshd's privilege-separation directory /run/sshd), and this repository's .venv.
#     bash scripts/loopback-cluster.sh            # CONFIG=configs/tiny-tp.toml PROMPTS=6 by default
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
CONFIG=${CONFIG:-configs/tiny-tp.toml}
PROMPTS=${PROMPTS:-6}
SSHD=$(command -v sshd || echo /usr/sbin/sshd)
missing=()
[ -x "$SSHD" ] || missing+=("sshd (openssh-server)")
for tool in ssh ssh-keygen pdsh; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ -x "$PY" ] || missing+=("$PY (make setup)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "loopback-cluster: missing ${missing[*]}: apt-get update && apt-get install openssh-server pdsh" >&2
  exit 2
fi
[ "$(id -u)" = 0 ] && mkdir -p /run/sshd   # sshd's privilege separation needs it

TMP=$(mktemp -d /tmp/deepen-loopback.XXXXXX)
SSHD_PID=
cleanup() {
  if [ -n "$SSHD_PID" ]; then kill "$SSHD_PID" 2>/dev/null || true; wait "$SSHD_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('$1', 0)); print(s.getsockname()[1])"; }
PORT=$(free_port 127.0.0.2)
MASTER_PORT=$(free_port 127.0.0.2)

ssh-keygen -q -t ed25519 -N '' -f "$TMP/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$TMP/user_key"
cp "$TMP/user_key.pub" "$TMP/authorized_keys"
cat > "$TMP/sshd_config" <<EOF
ListenAddress 127.0.0.2:$PORT
ListenAddress 127.0.0.3:$PORT
HostKey $TMP/host_key
PidFile $TMP/sshd.pid
AuthorizedKeysFile $TMP/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
AllowTcpForwarding no
X11Forwarding no
Match LocalAddress 127.0.0.2
    SetEnv DEEPEN_HOME=$TMP/home-a
Match LocalAddress 127.0.0.3
    SetEnv DEEPEN_HOME=$TMP/home-b
EOF
"$SSHD" -t -f "$TMP/sshd_config"
"$SSHD" -D -e -f "$TMP/sshd_config" 2> "$TMP/sshd.log" &
SSHD_PID=$!
echo "sshd (pid $SSHD_PID) on 127.0.0.2:$PORT and 127.0.0.3:$PORT; throwaway keys in $TMP"

# the launching side: an ssh on the PATH that reads this config (ssh takes ~/.ssh from the
# password database, not $HOME), for the runner's ssh check and pdsh alike; a HOME of its own for
# .deepspeed_env (the runner reads it there and in the working directory)
mkdir -p "$TMP/client/bin"
printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$TMP/ssh_config" > "$TMP/client/bin/ssh"
chmod +x "$TMP/client/bin/ssh"
export PATH=$TMP/client/bin:$PATH
cat > "$TMP/ssh_config" <<EOF
Host 127.0.0.2 127.0.0.3
    Port $PORT
    IdentityFile $TMP/user_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile $TMP/known_hosts
    BatchMode yes
EOF
chmod 600 "$TMP/ssh_config"
printf 'GLOO_SOCKET_IFNAME=lo\n' > "$TMP/client/.deepspeed_env"   # gloo between hosts on loopback
printf '127.0.0.2 slots=2\n127.0.0.3 slots=2\n' > "$TMP/hostfile"
for _ in $(seq 50); do
  ssh 127.0.0.3 true 2>/dev/null && ssh 127.0.0.2 true 2>/dev/null && break
  sleep 0.2
done
for host in 127.0.0.2 127.0.0.3; do echo "ssh $host: DEEPEN_HOME=$(ssh $host 'echo $DEEPEN_HOME')"; done

"$PY" - "$TMP/in.jsonl" "$PROMPTS" <<'EOF'
import json, sys
words = ["the cat", "a dog", "my friend", "the model", "café", "日本", "code", "this system"]
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"id": i, "prompt": f"{words[i % 8]} {words[(i * 5) % 8]} reads", "max_new_tokens": 8 + i % 5}) + "\n")
EOF
echo "== deepspeed --hostfile (127.0.0.2, 127.0.0.3) --master_addr 127.0.0.2 launcher/run.py --config $CONFIG"
T0=$(date +%s)
set +e
HOME=$TMP/client timeout 600 "$PY" -m deepspeed.launcher.runner --hostfile "$TMP/hostfile" --master_addr 127.0.0.2 \
  --master_port "$MASTER_PORT" launcher/run.py --config "$CONFIG" --input "$TMP/in.jsonl" --output "$TMP/out.jsonl" \
  --batch 3 > "$TMP/job.log" 2>&1
CODE=$?
set -e
grep -E "^(127\.0\.0\.[23]: )?deepen:|results ->|Running on the following workers|cmd = " "$TMP/job.log" | cut -c1-400 || true
echo "exit $CODE after $(( $(date +%s) - T0 )) s"
[ $CODE = 0 ] || { tail -n 40 "$TMP/job.log"; exit $CODE; }
echo "== one process, the same config and prompts"
DEEPEN_HOME=$TMP/home-a "$PY" -m launcher.cli generate --config "$CONFIG" --input "$TMP/in.jsonl" \
  --output "$TMP/single.jsonl" --batch 3 > "$TMP/single.out" 2> "$TMP/single.log"
"$PY" - "$TMP" <<'EOF'
import json, sys
from pathlib import Path
tmp = Path(sys.argv[1])
read = lambda p: {r["id"]: r for r in map(json.loads, p.read_text().splitlines())}
got, want = read(tmp / "out.jsonl"), read(tmp / "single.jsonl")
same = sum(got.get(i) == r for i, r in want.items())
print(f"{same} of {len(want)} completions equal to one process's")
for name in ("home-a", "home-b"):
    home = tmp / name
    held = sorted(str(p.relative_to(home)) for p in home.glob("*/*") if not p.name.startswith("."))
    print(f"{name} (DEEPEN_HOME of {'127.0.0.2' if name == 'home-a' else '127.0.0.3'}): {', '.join(held)}")
sys.exit(0 if same == len(want) == len(got) else 1)
EOF
