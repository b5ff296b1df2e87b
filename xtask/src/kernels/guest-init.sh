#!/bin/sh
# /init of the kernel-matrix guest: two pods (network namespaces) joined through the guest's
# root namespace (the node), ambit node capturing pod a, and one real connection a -> b.
# Everything the host checks is printed as "AMBIT-..." lines on the serial console.
export PATH=/bin:/sbin
# iproute2's ip (busybox's has no netns support); called by path: busybox prefers its applets.
say() { echo "AMBIT-GUEST $*"; }
finish() { say END; sync; poweroff -f; sleep 10; }

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /run/netns /sys/fs/bpf /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
say "kernel $(uname -r)"
for m in /modules/*.ko; do insmod "$m" || say "insmod-failed $m"; done

/sbin/ip link set lo up
/sbin/ip netns add pa && /sbin/ip netns add pb || { say "fail: /sbin/ip netns add"; finish; }
/sbin/ip link add va type veth peer name eth0 netns pa || { say "fail: veth a"; finish; }
/sbin/ip link add vb type veth peer name eth0 netns pb || { say "fail: veth b"; finish; }
/sbin/ip addr add 10.0.1.1/24 dev va && /sbin/ip link set va up
/sbin/ip addr add 10.0.2.1/24 dev vb && /sbin/ip link set vb up
for p in 1 2; do
  ns=pa; [ $p = 2 ] && ns=pb
  /sbin/ip -n $ns link set lo up
  /sbin/ip -n $ns link set eth0 up
  /sbin/ip -n $ns addr add 10.0.$p.2/24 dev eth0
  /sbin/ip -n $ns route add default via 10.0.$p.1
done
echo 1 > /proc/sys/net/ipv4/ip_forward
mkdir /sys/fs/cgroup/pods
in_pod() { ns=$1; shift; sh -c 'echo $$ > /sys/fs/cgroup/pods/cgroup.procs && exec nsenter --net=/run/netns/'"$ns"' "$@"' sh "$@"; }

/bin/ambit probe > /tmp/probe.txt 2>&1
say "probe-exit $?"
sed 's/^/AMBIT-PROBE /' /tmp/probe.txt

/bin/ambit node --mesh-file /mesh.yaml --node-name guest --cgroup /sys/fs/cgroup/pods > /tmp/ambit.log 2>&1 &
AMBIT=$!
ready=0
for i in $(seq 1 600); do
  kill -0 $AMBIT 2>/dev/null || break
  if wget -q -O /dev/null http://127.0.0.1:15021/healthz/ready 2>/dev/null; then ready=1; break; fi
  sleep 0.2
done
if [ $ready = 0 ]; then
  wait $AMBIT
  say "ambit-exit $?"
  sed 's/^/AMBIT-LOG /' /tmp/ambit.log
  finish
fi
say ready

in_pod pb /bin/netprobe sink 0.0.0.0:9000 > /tmp/sink.log 2>&1 &
for i in $(seq 1 100); do grep -q listening /tmp/sink.log && break; sleep 0.1; done
in_pod pa /bin/netprobe send 10.0.2.2:9000 4194304 > /tmp/send.log 2>&1
say "send-exit $?"
sed 's/^/AMBIT-SEND /' /tmp/send.log
sleep 0.5
wget -q -O - http://127.0.0.1:15020/stats/prometheus | grep -E '^ambit_(capture_events_total|proxy_connections_opened_total)' | sed 's/^/AMBIT-METRIC /'
wget -q -O - http://127.0.0.1:15000/config_dump | grep -o '"inbound_attachment": "[a-z_]*"' | sed 's/^/AMBIT-DUMP /'
grep ' access: ' /tmp/ambit.log | sed 's/^/AMBIT-ACCESS /'
finish
