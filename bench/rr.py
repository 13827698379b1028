# One TCP connection to HOST:PORT (an echo server), 5,000 1-byte round trips, the first 500 not
# counted: prints "p50 p99" in microseconds. Used by bench/network.sh and bench/flows.sh.
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port))); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for i in range(5000):
    t = time.perf_counter_ns(); s.sendall(b"x"); s.recv(1); times.append(time.perf_counter_ns() - t)
times = sorted(times[500:])
print(times[len(times) // 2] / 1000, times[len(times) * 99 // 100] / 1000)
