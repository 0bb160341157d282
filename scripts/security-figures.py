#!/usr/bin/env python3
"""Security figures of a running spendguard, measured over loopback with bounded loops.

Usage: scripts/security-figures.py BINARY [--old]

Starts BINARY (`spendguard serve`) on a temporary SQLite database and measures:
  1. idle connections: opens 2,000 and counts how many the server keeps open
     (at once, and after its idle timeout);
  2. slow headers: 50 connections sending one header byte every 2 s, and when they close;
  3. invented methods: 20,000 requests with distinct invented methods, then the server's
     resident memory (VmRSS) and the number of metric series.
`--old` for a build without the metrics key (reads /metrics without one).
Run with `ulimit -n 8192` so the client and the server can hold the sockets.
"""
import os, re, socket, subprocess, sys, tempfile, time, urllib.request

ADMIN = "figures-admin-key-0123456789abcdef0123"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def metrics(port, old):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if not old:
        req.add_header("Authorization", f"Bearer {ADMIN}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def server_open(sock):
    """Whether the server still holds the connection (no EOF or reset waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def main():
    binary, old = sys.argv[1], "--old" in sys.argv
    port = free_port()
    d = tempfile.mkdtemp()
    env = dict(os.environ, SPENDGUARD_ADMIN_KEY=ADMIN, RUST_LOG="warn")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--database", f"{d}/db"],
        cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"rss at start: {rss_kib(proc.pid)} KiB")

        # 1. 2,000 idle connections.
        conns = []
        for _ in range(2000):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(2)
        print(f"idle: of 2000 opened, held after 2 s: {sum(server_open(c) for c in conns)}")
        deadline = time.time() + 90
        while time.time() < deadline and any(server_open(c) for c in conns):
            time.sleep(1)
        held = sum(server_open(c) for c in conns)
        print(f"idle: held after {90 - max(0, int(deadline - time.time()))} s: {held}")
        for c in conns:
            c.close()

        # 2. 50 connections sending a header byte every 2 s (bounded: 40 s).
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
        start, line = time.time(), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        closed_at = {}
        for i in range(20):
            for n, c in enumerate(slow):
                if n in closed_at:
                    continue
                try:
                    c.sendall(line[i:i + 1])
                except OSError:
                    closed_at[n] = time.time() - start
            time.sleep(2)
            for n, c in enumerate(slow):
                if n not in closed_at and not server_open(c):
                    closed_at[n] = time.time() - start
        times = sorted(closed_at.values())
        print(f"slow headers: {len(closed_at)} of 50 closed within 40 s"
              + (f", the last after {times[-1]:.0f} s" if times else ""))
        for c in slow:
            c.close()

        # 3. 20,000 distinct invented methods, 200 per keep-alive connection.
        rss_before = rss_kib(proc.pid)
        sent = 0
        for k in range(100):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            f = c.makefile("rb")
            for j in range(200):
                c.sendall(f"X{k}Y{j} /healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status = f.readline()
                length = 0
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b""):
                        break
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":")[1])
                f.read(length)
                sent += 1
            c.close()
        text = metrics(port, old)
        series = sum(1 for l in text.splitlines()
                     if l.startswith("spendguard_http_request_duration_seconds_count"))
        print(f"invented methods: {sent} requests; rss {rss_before} -> {rss_kib(proc.pid)} KiB;"
              f" latency series: {series}; /metrics is {len(text)} bytes")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
