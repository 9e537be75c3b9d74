# Guest job run by tests/interop/test_linux_host.py through ../shared/tools/guest/run-guest.sh: the Linux
# kernel's nvme-tcp host, nvme-cli 2.3 and fio 3.33 against `nvme-lm target serve` on the host, reached as
# $TARGET_ADDR:$PORT (slirp --tcp-port). Each step keeps steps/NAME.out (stdout), steps/NAME.err and one line
# "NAME<TAB>rc<TAB>ms<TAB>command" in steps.tsv; the host test asserts on them step by step. The job goes on
# after a failed step (one bug must not hide the rest) and exits 0: the verdicts are the host's.
#
# Env (--env): PORT, PORT2 (a second listener: a second path), NQN, NSID (1), NR_IO_QUEUES (2),
# NR_WRITE_QUEUES (2: 4 I/O queues on 2 vCPUs), FIO_RUNTIME (60), FIO_NUMJOBS (4), FIO_IODEPTH (32), FIO_BSSPLIT,
# FIO_AREA_MIB (per job), KEEP_OFFSET_MIB, KEEP_MIB, DSM_OFFSET_MIB, LIVE_OFFSET_MIB, LIVE_RUNTIME (30),
# RESTART_TIMEOUT (120). Target restarts are a handshake through the 9p share: the guest writes
# $OUT/NAME.request and waits for $OUT/NAME.done, which the host writes once a new target process serves the
# same files. "restart" comes after `nvme disconnect`; "restart2" while connected with I/O in flight (the
# kernel must reconnect by itself). Phases are marked in the kernel log ("nvme-lm-interop: ...").
set -u
PORT=${PORT:-${TCP_PORTS%% *}}
NSID=${NSID:-1}
NR_IO_QUEUES=${NR_IO_QUEUES:-2}
NR_WRITE_QUEUES=${NR_WRITE_QUEUES:-2}
FIO_RUNTIME=${FIO_RUNTIME:-60}
FIO_NUMJOBS=${FIO_NUMJOBS:-4}
FIO_IODEPTH=${FIO_IODEPTH:-32}
FIO_BSSPLIT=${FIO_BSSPLIT:-4k/40:8k/15:16k/15:32k/10:64k/10:128k/5:512k/5}
FIO_AREA_MIB=${FIO_AREA_MIB:-32}       # each fio job writes its own area: [j * AREA, (j + 1) * AREA)
KEEP_OFFSET_MIB=${KEEP_OFFSET_MIB:-192} # a sequentially written region checked again after the restart
KEEP_MIB=${KEEP_MIB:-16}
DSM_OFFSET_MIB=${DSM_OFFSET_MIB:-224}   # 4 MiB written, the middle 2 MiB deallocated
LIVE_OFFSET_MIB=${LIVE_OFFSET_MIB:-160} # written and verified by fio across the live restart
LIVE_RUNTIME=${LIVE_RUNTIME:-30}
RESTART_TIMEOUT=${RESTART_TIMEOUT:-120}
S=$OUT/steps
mkdir -p "$S"
: >"$OUT/steps.tsv"

step() { # step NAME CMD...: run CMD, keep its stdout, stderr, status and time
    local name=$1 t0 t1 rc
    shift
    t0=${EPOCHREALTIME/./}
    "$@" >"$S/$name.out" 2>"$S/$name.err"
    rc=$?
    t1=${EPOCHREALTIME/./}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( (t1 - t0) / 1000 ))" "$*" >>"$OUT/steps.tsv"
    printf '[%6s ms] %-28s rc=%s\n' "$(( (t1 - t0) / 1000 ))" "$name" "$rc"
    return $rc
}
supported() { # the IDs whose bit 0 is set in a 256-dword support log (LIDs in log 00h, FIDs in log 12h)
    od -An -v -tu4 -w4 "$1" | awk '{ if ($1 % 2) printf "%02x\n", NR - 1 }'
}
wait_for() { # wait_for PATH SECONDS
    local i
    for ((i = 0; i < $2 * 10; i++)); do [ -e "$1" ] && return 0; sleep 0.1; done
    return 1
}
find_ctrl() { # /dev/nvmeX of subsystem $NQN reached through port $1 (not a discovery controller)
    local d i
    for ((i = 0; i < 100; i++)); do
        for d in /sys/class/nvme/nvme*; do
            [ "$(cat "$d/subsysnqn" 2>/dev/null)" = "$NQN" ] && [[ $(cat "$d/address") == *"trsvcid=$1,"* ]] &&
                [ "$(cat "$d/state")" = live ] && { echo "/dev/${d##*/}"; return 0; }
        done
        sleep 0.1
    done
    return 1
}
find_dev() { # the namespace's block device (the multipath head node with native multipath)
    local b i
    for ((i = 0; i < 100; i++)); do
        for b in /sys/block/nvme*n"$NSID"; do
            case ${b##*/} in *c*) continue ;; esac
            [ "$(cat "$b/device/subsysnqn" 2>/dev/null)" = "$NQN" ] && { echo "/dev/${b##*/}"; return 0; }
        done
        sleep 0.1
    done
    return 1
}
mark() { echo "nvme-lm-interop: $*" >/dev/kmsg; }
discovery_state() { # the state of the (persistent) discovery controller
    local d
    for d in /sys/class/nvme/nvme*; do
        [ "$(cat "$d/subsysnqn")" = nqn.2014-08.org.nvmexpress.discovery ] && cat "$d/state"
    done
    return 0
}
restart_target() { # restart_target NAME: ask the host to restart the target, wait until it has
    echo requested >"$OUT/$1.request"
    wait_for "$OUT/$1.done" "$RESTART_TIMEOUT"
}
sum_region() { # sha256 of MIB MiB at OFFSET MiB of the namespace, read with O_DIRECT
    dd if="$DEV" bs=1M skip="$1" count="$2" iflag=direct status=none | sha256sum | cut -d' ' -f1
}
lba_status_raw() { # Get LBA Status ATYPE 02h through admin-passthru with the right data length
    nvme admin-passthru "$CTRL" --opcode=0x86 --namespace-id="$NSID" --cdw10=$((DSM_SLBA & 0xFFFFFFFF)) \
        --cdw11=$((DSM_SLBA >> 32)) --cdw12=63 --cdw13=$(((2 << 24) | (4 * MIB_LBAS))) --data-len=256 --read \
        --raw-binary
}

modprobe nvme-tcp
echo "nvme-tcp interop job: target $TARGET_ADDR:$PORT, subsystem $NQN"
step version nvme version

# ---------------------------------------------------------------- discovery
step discover-json nvme discover -t tcp -a "$TARGET_ADDR" -s "$PORT" -o json
step discover nvme discover -t tcp -a "$TARGET_ADDR" -s "$PORT"
# a persistent discovery controller, kept until the first restart: Keep Alive on the discovery controller
step discover-persistent nvme discover -t tcp -a "$TARGET_ADDR" -s "$PORT" -p -o json

# ---------------------------------------------------------------- Connects the target must refuse
mark "negative begin"
step connect-bad-host nvme connect -t tcp -a "$TARGET_ADDR" -s "$PORT" -n "$NQN" -D \
    -q nqn.2014-08.org.example:not-on-the-allow-list
step connect-bad-nqn nvme connect -t tcp -a "$TARGET_ADDR" -s "$PORT" -n nqn.2014-08.org.example:no-such-subsystem
mark "negative end"

# ---------------------------------------------------------------- connect with several I/O queues
step connect nvme connect -t tcp -a "$TARGET_ADDR" -s "$PORT" -n "$NQN" -i "$NR_IO_QUEUES" -W "$NR_WRITE_QUEUES"
CTRL=$(find_ctrl "$PORT")
DEV=$(find_dev)
echo "controller $CTRL, namespace $DEV"
C=/sys/class/nvme/${CTRL##*/}
for a in cntlid queue_count sqsize kato transport address state subsysnqn; do
    echo "$a=$(cat "$C/$a" 2>/dev/null)"
done >"$OUT/sysfs-ctrl.txt"

step list-json nvme list -o json
step list-subsys-json nvme list-subsys -o json
step id-ctrl-json nvme id-ctrl "$CTRL" -o json
step id-ctrl-bin nvme id-ctrl "$CTRL" -b
step id-ns-json nvme id-ns "$CTRL" -n "$NSID" -o json
step id-ns-bin nvme id-ns "$CTRL" -n "$NSID" -b
step ns-descs-json nvme ns-descs "$CTRL" -n "$NSID" -o json
step list-ns nvme list-ns "$CTRL"
step nvm-id-ctrl-bin nvme nvm-id-ctrl "$CTRL" -o binary
step nvm-id-ns-bin nvme nvm-id-ns "$CTRL" -n "$NSID" -o binary
step id-ns-broadcast-json nvme id-ns "$CTRL" -n 0xffffffff -o json
step id-iocs nvme id-iocs "$CTRL"
step get-property-cap nvme get-property "$CTRL" -o 0 -H
step get-property-vs nvme get-property "$CTRL" -o 8
step get-property-cc nvme get-property "$CTRL" -o 0x14
step get-property-csts nvme get-property "$CTRL" -o 0x1c -H

# ---------------------------------------------------------------- every log page we advertise (log 00h)
step get-log-00 nvme get-log "$CTRL" -i 0 -l 1024 -b
supported "$S/get-log-00.out" >"$OUT/lids" 2>/dev/null
for lid in $(cat "$OUT/lids"); do
    case $lid in
    00) continue ;;
    12) len=1024 ;;
    02|03) len=512 ;;
    *) len=4096 ;;
    esac
    step "get-log-$lid" nvme get-log "$CTRL" -i "0x$lid" -l "$len" -b
done
step get-log-05-lpo nvme get-log "$CTRL" -i 5 -l 2048 --lpo=2048 -b
step smart-log-json nvme smart-log "$CTRL" -o json
step fw-log-json nvme fw-log "$CTRL" -o json
# --csi: without it nvme-cli 2.3 reads CAP through a PCI BAR mmap, which a fabrics controller has not
step effects-log-json nvme effects-log "$CTRL" --csi=0 -o json

# an I/O error on purpose (a read past the end of the namespace), which the error log must then show
NSZE=$(jq -r '.nsze' "$S/id-ns-json.out" 2>/dev/null || echo 0)
step read-past-end nvme read "$DEV" -s "$NSZE" -c 0 -z 512 -d /dev/null
step error-log-json nvme error-log "$CTRL" -o json

# ---------------------------------------------------------------- every supported feature (log 12h)
supported "$S/get-log-12.out" >"$OUT/fids" 2>/dev/null
for fid in $(cat "$OUT/fids"); do
    step "get-feature-$fid" nvme get-feature "$CTRL" -f "0x$fid" -s 0
    step "get-feature-$fid-sel3" nvme get-feature "$CTRL" -f "0x$fid" -s 3
done

# set, read back, restore (current values only: nothing saved)
step set-feature-04 nvme set-feature "$CTRL" -f 4 -v 0x160
step set-feature-04-get nvme get-feature "$CTRL" -f 4 -s 0
TMPTH=$(grep -o 'value:0x[0-9a-f]*' "$S/get-feature-04.out" | cut -d: -f2)
step set-feature-04-restore nvme set-feature "$CTRL" -f 4 -v "$TMPTH"
step set-feature-06 nvme set-feature "$CTRL" -f 6 -v 0
step set-feature-06-get nvme get-feature "$CTRL" -f 6 -s 0
step set-feature-06-restore nvme set-feature "$CTRL" -f 6 -v 1

# ---------------------------------------------------------------- I/O commands from nvme-cli
head -c 4096 /dev/urandom >/tmp/block
step write-block nvme write "$DEV" -s 4096 -c 7 -z 4096 -d /tmp/block
step compare-match nvme compare "$DEV" -s 4096 -c 7 -z 4096 -d /tmp/block
step compare-mismatch nvme compare "$DEV" -s 4096 -c 7 -z 4096 -d /dev/zero
step verify nvme verify "$DEV" -s 4096 -c 7
step write-zeroes nvme write-zeroes "$DEV" -s 2048 -c 7
step write-zeroes-read cmp -n 4096 /dev/zero <(dd if="$DEV" bs=512 skip=2048 count=8 iflag=direct status=none)
step flush nvme flush "$CTRL" -n "$NSID"

# ---------------------------------------------------------------- a second path (native multipath)
step connect-path2 nvme connect -t tcp -a "$TARGET_ADDR" -s "$PORT2" -n "$NQN" -i 1
CTRL2=$(find_ctrl "$PORT2")
SUBSYS=$(basename "$(readlink -f "/sys/block/${DEV##*/}/device")")
step multipath-subsys-json nvme list-subsys -o json
echo round-robin >"/sys/class/nvme-subsystem/$SUBSYS/iopolicy"
step multipath-fio fio --name=multipath --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=16 --offset=176M --size=8M --verify=crc32c --do_verify=1 --output-format=json \
    --output="$OUT/fio-multipath.json"
grep -H . /sys/block/nvme*c*n"$NSID"/stat >"$OUT/multipath-stat.txt" 2>/dev/null
echo numa >"/sys/class/nvme-subsystem/$SUBSYS/iopolicy"
step disconnect-path2 nvme disconnect -d "${CTRL2##*/}"

# ---------------------------------------------------------------- deallocate, then Get LBA Status
BS=$(jq -r '.lbafs[.flbas % 16].ds' "$S/id-ns-json.out" 2>/dev/null || echo 9)
BS=$((1 << BS))
DSM_SLBA=$((DSM_OFFSET_MIB * 1048576 / BS))
MIB_LBAS=$((1048576 / BS))
echo "bs=$BS slba=$DSM_SLBA mib_lbas=$MIB_LBAS" >"$OUT/dsm-geometry"
step dsm-fill dd if=/dev/urandom of="$DEV" bs=1M count=4 seek="$DSM_OFFSET_MIB" oflag=direct status=none
step lba-status-before-raw lba_status_raw
step lba-status-before nvme get-lba-status "$CTRL" -n "$NSID" -s "$DSM_SLBA" -m 63 -a 2 -l $((4 * MIB_LBAS)) -o json
step dsm-ad nvme dsm "$DEV" -n "$NSID" --ad -s $((DSM_SLBA + MIB_LBAS)) -b $((2 * MIB_LBAS))
step lba-status-after-raw lba_status_raw
step lba-status-after nvme get-lba-status "$CTRL" -n "$NSID" -s "$DSM_SLBA" -m 63 -a 2 -l $((4 * MIB_LBAS)) -o json
step dsm-read-zeroes cmp -n 2097152 /dev/zero \
    <(dd if="$DEV" bs=1M count=2 skip=$((DSM_OFFSET_MIB + 1)) iflag=direct status=none)
step id-ns-after-dsm-json nvme id-ns "$CTRL" -n "$NSID" -o json

# ---------------------------------------------------------------- fio: verify=crc32c, mixed sizes, qd 32, jobs
step fio-verify fio --name=interop --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite \
    --bssplit="$FIO_BSSPLIT" --iodepth="$FIO_IODEPTH" --numjobs="$FIO_NUMJOBS" --size="${FIO_AREA_MIB}M" \
    --offset_increment="${FIO_AREA_MIB}M" --verify=crc32c --verify_backlog=32 --verify_fatal=1 \
    --time_based --runtime="$FIO_RUNTIME" --group_reporting --output-format=json --output="$OUT/fio-verify.json"
step smart-log-after-json nvme smart-log "$CTRL" -o json

# data kept across the target restart: a fio-written region (verify headers, verified now and after)
keep=(--name=keep --ioengine=libaio --direct=1 --rw=write --bs=64k --iodepth=16
      --offset="${KEEP_OFFSET_MIB}M" --size="${KEEP_MIB}M" --verify=crc32c --output-format=json)
step keep-write fio "${keep[@]}" --filename="$DEV" --do_verify=1 --output="$OUT/fio-keep-write.json"
step keep-sum sum_region "$KEEP_OFFSET_MIB" "$KEEP_MIB"

# a controller reset: the kernel ends the association and connects again (a new dynamic controller)
step reset nvme reset "$CTRL"
sleep 1
step reset-state cat "$C/state" "$C/cntlid"
step reset-keep-sum sum_region "$KEEP_OFFSET_MIB" "$KEEP_MIB"

# ---------------------------------------------------------------- disconnect
step discovery-ctrl-state discovery_state
step disconnect-discovery nvme disconnect -n nqn.2014-08.org.nvmexpress.discovery
step disconnect nvme disconnect -n "$NQN"
sleep 0.5
step gone sh -c "! grep -qsx '$NQN' /sys/class/nvme/*/subsysnqn"

# ---------------------------------------------------------------- target restart on the same files
step wait-restart restart_target restart
# connect-all: the discovery log's TRADDR/TRSVCID must be reachable; header and data digests this time, and a
# short reconnect delay for the live restart below
step connect-all nvme connect-all -t tcp -a "$TARGET_ADDR" -s "$PORT" -i "$NR_IO_QUEUES" --hdr-digest --data-digest \
    --reconnect-delay=1 --ctrl-loss-tmo=120
CTRL=$(find_ctrl "$PORT")
DEV=$(find_dev)
echo "after the restart: controller $CTRL, namespace $DEV"
step restart-id-ctrl-json nvme id-ctrl "$CTRL" -o json
step restart-id-ns-json nvme id-ns "$CTRL" -n "$NSID" -o json
step restart-keep-verify fio "${keep[@]}" --filename="$DEV" --verify_only=1 --output="$OUT/fio-keep-verify.json"
step restart-keep-sum sum_region "$KEEP_OFFSET_MIB" "$KEEP_MIB"
step restart-fio-area-sum sum_region 0 $((FIO_AREA_MIB * FIO_NUMJOBS))
step restart-lba-status-raw lba_status_raw

# ---------------------------------------------------------------- target restart with I/O in flight
# fio writes and verifies across it; the kernel notices the dead association (under slirp through its Keep
# Alive timeout, socat holds the guest side open) and reconnects by itself: the I/O waits, nothing fails.
mark "live-restart begin"
live=(--name=live --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bssplit=4k/50:16k/25:128k/25
      --iodepth=8 --offset="${LIVE_OFFSET_MIB}M" --size=16M --verify=crc32c --verify_backlog=16 --verify_fatal=1
      --time_based --runtime="$LIVE_RUNTIME" --output-format=json --output="$OUT/fio-live.json")
fio "${live[@]}" >"$S/live-fio.out" 2>"$S/live-fio.err" &
LIVE_PID=$!
sleep 5
step live-restart restart_target restart2
step live-fio wait "$LIVE_PID"
step live-reconnected sh -c "dmesg | grep -q '${CTRL##*/}: Successfully reconnected'"
step live-state cat "/sys/class/nvme/${CTRL##*/}/state"
step live-keep-sum sum_region "$KEEP_OFFSET_MIB" "$KEEP_MIB"
mark "live-restart end"
step restart-disconnect nvme disconnect -n "$NQN"

dmesg >"$OUT/dmesg.txt"
dmesg | tail -50
echo "failed steps: $(awk -F'\t' '$2 != 0 { printf "%s ", $1 }' "$OUT/steps.tsv")"
exit 0
