#!/usr/bin/env bash
# A headless baresip softphone for the lab started by `make run`.
#
#   deploy/baresip/phone.sh EXT                # register EXT and auto-answer calls (Ctrl-C to stop)
#   deploy/baresip/phone.sh EXT CALLEE [SECS]  # register EXT and call CALLEE, hang up after SECS (10)
#
# The phone plays a short spoken sentence ("This is extension EXT ...") followed by silence, so the
# other side and the recording have something to hear. Its password and the SIP Server's address
# come from var/lab.json (override the file with LAB_JSON=...). Its files live in var/phones/EXT/:
# baresip's config, the speech file, and what it sent and received (rec/*.wav).
set -euo pipefail
ext=${1:?usage: phone.sh EXT [CALLEE [SECONDS]]}
callee=${2:-}
secs=${3:-10}
lab_json=${LAB_JSON:-var/lab.json}
for tool in baresip espeak-ng sox python3; do
    command -v "$tool" >/dev/null || { echo "phone.sh: $tool is missing (deploy/install-debian-packages.sh)" >&2; exit 1; }
done
[ -f "$lab_json" ] || { echo "phone.sh: $lab_json not found: start the lab with 'make run' first" >&2; exit 1; }

read -r sip_host sip_port domain password < <(python3 - "$lab_json" "$ext" <<'PY'
import json, sys
lab = json.load(open(sys.argv[1]))
for tenant in lab["tenants"]:
    for user in tenant["users"]:
        if user["extension"] == sys.argv[2]:
            print(lab["sip"]["host"], lab["sip"]["port"], tenant["domain"], user["password"])
            sys.exit(0)
sys.exit(f"phone.sh: no user {sys.argv[2]} in {sys.argv[1]}")
PY
)

dir=var/phones/$ext
mkdir -p "$dir/rec"
# Ports of this phone: SIP on 5100 + 2 * (last two digits) (baresip also binds TLS on SIP + 1).
n=$((10#${ext: -2}))
sip_local=$((5100 + 2 * n))
rtp_base=$((40000 + 20 * n))
espeak-ng -w "$dir/raw.wav" "This is extension $ext of the callvault lab. One, two, three, four, five."
sox -D "$dir/raw.wav" -r 8000 -c 1 -b 16 "$dir/speech.wav" pad 0.5 "$((secs > 5 ? secs + 60 : 60))"
cat > "$dir/config" <<CFG
poll_method epoll
sip_listen 127.0.0.1:$sip_local
net_interface 127.0.0.1
audio_source aufile,$PWD/$dir/speech.wav
audio_player aubridge,play-$ext
audio_alert aubridge,alert-$ext
rtp_ports $rtp_base-$((rtp_base + 19))
module_path /usr/lib/baresip/modules
module g711.so
module aufile.so
module aubridge.so
module sndfile.so
module_app account.so
module_app menu.so
snd_path $PWD/$dir/rec
CFG
# Everything goes through the SIP Server (outbound proxy); digest credentials from the lab.
echo "<sip:$ext@$domain;transport=udp>;auth_pass=$password;outbound=\"sip:$sip_host:$sip_port;transport=udp\";regint=300;answermode=auto;audio_codecs=PCMU,PCMA" > "$dir/accounts"
: > "$dir/contacts"
if [ -n "$callee" ]; then
    echo "phone $ext: calling $callee@$domain for $secs s (through sip:$sip_host:$sip_port)"
    exec baresip -f "$dir" -e "/dial sip:$callee@$domain" -t "$((secs + 2))"
else
    echo "phone $ext: registered at sip:$sip_host:$sip_port, auto-answering; Ctrl-C to stop"
    exec baresip -f "$dir"
fi
