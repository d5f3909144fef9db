#!/usr/bin/env python3
"""The paysync soak test (issue 7, item 6). Python standard library only.

Runs `paysync run` over ORDERS orders (default 200,000) against `paysync mock-server`
on 127.0.0.1 with a share of faulted orders (default 5 %: 500, 502, 503, HTML 502,
malformed JSON, reset mid-body, oversized body, 429) and a server-side rate limit,
SIGKILLs the run KILLS times (default 3) at random points of its progress, restarts it
each time, lets the last run finish, then checks:

- every manifest verifies (sha256 and row count of its data file), and no data file
  without a manifest or temporary file is left in the output directory;
- every (provider, order_no, status, tracking) appears exactly once across all
  manifested files;
- every input order has rows, and its latest row is final (settled, or stopped at
  its deadline);
- `paysync status --json` reports no unexported rows.

It prints the figures and exits 0 when every check holds, 1 otherwise. The work
directory is kept (and printed) when a check fails or with --keep.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=200_000)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--fault-share", type=float, default=0.05)
    p.add_argument("--fault-kinds", default="500,502,503,html,malformed,reset,large,429")
    p.add_argument("--server-rate", type=float, default=2500.0,
                   help="the mock server's rate limit, requests per second")
    p.add_argument("--client-rate", type=float, default=3000.0,
                   help="fetch.rate_limit (above the server's, so it throttles)")
    p.add_argument("--retry-after", default="zero",
                   choices=["seconds", "http-date", "zero", "absent"],
                   help="how the server's 429s say when to retry (seconds: each pauses"
                        " every worker for at least 1 s)")
    p.add_argument("--max-wait", default="2h",
                   help="settle.max_wait (longer than the soak: every order settles)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "paysync"))
    p.add_argument("--dir", help="work directory (default: a new temp directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args()


class Mock:
    """`paysync mock-server` on 127.0.0.1:0; the address comes from its first line."""

    def __init__(self, binary, flags, log):
        self.proc = subprocess.Popen(
            [binary, "mock-server", "--listen", "127.0.0.1:0", *flags],
            stdout=subprocess.PIPE, stderr=log)
        line = self.proc.stdout.readline().decode()
        m = re.search(r"listening on http://(\S+)", line)
        if not m:
            raise SystemExit(f"mock server did not start: {line!r}")
        self.addr = m.group(1)

    def stats(self):
        with urllib.request.urlopen(f"http://{self.addr}/__mock/stats", timeout=10) as r:
            return json.load(r)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_inputs(work, args, base_url):
    rnd = random.Random(args.seed)
    orders = [f"SOAK-{i:07d}-{rnd.getrandbits(32):08x}" for i in range(args.orders)]
    with open(work / "orders.csv", "w") as f:
        f.write("order_no,customer\n")
        for i, o in enumerate(orders):
            f.write(f"{o},customer-{i % 997}\n")
    (work / "secret").write_text("demo-secret\n")
    (work / "config.toml").write_text(f"""
[provider]
kind = "payprotocol"
base_url = "{base_url}"
api_key = "demo-key"
api_secret_file = "secret"

[fetch]
concurrency = {args.concurrency}
rate_limit = {args.client_rate}
burst = 50
timeout = "10s"
max_attempts = 8
backoff_base = "50ms"
backoff_max = "2s"

[settle]
poll_interval = "1s"
confirming_interval = "1s"
backoff_factor = 1.0
# Partially paid orders never change in the mock: final here, so the soak ends.
unsettled = ["pending", "confirming"]
max_wait = "{args.max_wait}"
wait = "2h"

[output]
dir = "out"
format = "jsonl"

[state]
path = "state.db"
""")
    return orders


def run_paysync(binary, work, log, kill_at_requests, mock):
    """One `paysync run`; SIGKILLed once the server has seen `kill_at_requests`
    detail requests (None: run to the end). Returns (exit code, killed, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [binary, "run", "--config", "config.toml", "--input", "orders.csv", "--no-progress"],
        cwd=work, stdout=log, stderr=log)
    while proc.poll() is None:
        if kill_at_requests is not None and \
                mock.stats()["payprotocol_detail_requests"] >= kill_at_requests:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return proc.returncode, True, time.monotonic() - t0
        time.sleep(0.05)
    return proc.returncode, False, time.monotonic() - t0


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(work, orders, binary):
    """Every check of the module docs; returns (problems, figures)."""
    out = work / "out"
    problems = []
    names = sorted(os.listdir(out))
    manifests = [n for n in names if n.endswith(".manifest.json")]
    covered = set(manifests)
    seen = set()
    latest = {}
    statuses = Counter()
    rows = 0
    for m in manifests:
        man = json.loads((out / m).read_text())
        data = man["data_file"]
        covered.add(data)
        if sha256(out / data) != man["sha256"]:
            problems.append(f"{data}: sha256 differs from its manifest")
        n = 0
        with open(out / data) as f:
            for line in f:
                n += 1
                r = json.loads(line)
                key = (r["provider"], r["order_no"], r["status"], r["tracking"])
                if key in seen:
                    problems.append(f"duplicate row {key}")
                seen.add(key)
                statuses[r["status"]] += 1
                old = latest.get(r["order_no"])
                if old is None or old["observed_at"] <= r["observed_at"]:
                    latest[r["order_no"]] = r
        rows += n
        if n != man["rows"]:
            problems.append(f"{data}: {n} rows, manifest says {man['rows']}")
    stray = [n for n in names if n not in covered and not n.startswith("rejects-")]
    if stray:
        problems.append(f"files without a manifest: {stray[:10]}")
    missing = [o for o in orders if o not in latest]
    if missing:
        problems.append(f"{len(missing)} orders have no row, e.g. {missing[:5]}")
    unfinished = [o for o, r in latest.items()
                  if not (r["settled"] or r["tracking"] == "deadline")]
    if unfinished:
        problems.append(f"{len(unfinished)} orders end unsettled, e.g. {unfinished[:5]}")
    extra = set(latest) - set(orders)
    if extra:
        problems.append(f"{len(extra)} rows for orders not in the input")
    st = subprocess.run([binary, "status", "--config", "config.toml", "--json"],
                        cwd=work, capture_output=True)
    unexported = json.loads(st.stdout)["unexported_rows"] if st.returncode == 0 else None
    if unexported != 0:
        problems.append(f"status: unexported rows {unexported} ({st.stderr.decode()[:200]})")
    final = Counter(r["status"] if r["tracking"] != "deadline" else "deadline"
                    for r in latest.values())
    figures = {
        "data files": len(manifests),
        "rows": rows,
        "orders with rows": len(latest),
        "rows by status": dict(sorted(statuses.items())),
        "final state by order": dict(sorted(final.items())),
    }
    return problems, figures


def main():
    args = parse_args()
    binary = str(Path(args.binary).resolve())
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{binary} is not built (cargo build --release, or --binary)")
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="paysync-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "soak.log", "ab")
    mock = Mock(binary, [
        "--fault-share", str(args.fault_share), "--fault-kinds", args.fault_kinds,
        "--rate-limit", str(args.server_rate), "--retry-after", args.retry_after,
        "--seed", str(args.seed),
    ], log)
    ok = False
    try:
        orders = write_inputs(work, args, f"http://{mock.addr}/api/mer")
        rnd = random.Random(args.seed + 1)
        # Kill points: random shares of the first pass over the input, in order.
        kill_points = sorted(int(args.orders * rnd.uniform(0.1, 0.9))
                             for _ in range(args.kills))
        print(f"soak: {args.orders} orders, faults {args.fault_share:.0%} "
              f"({args.fault_kinds}), server limit {args.server_rate}/s, client "
              f"{args.client_rate}/s; SIGKILL at {kill_points} detail requests; in {work}")
        runs = []
        t0 = time.monotonic()
        for point in kill_points + [None]:
            while True:
                code, killed, secs = run_paysync(binary, work, log, point, mock)
                runs.append((code, killed, round(secs, 1)))
                print(f"soak: run {len(runs)}: exit {code}{' (SIGKILL)' if killed else ''}"
                      f" after {secs:.1f} s", flush=True)
                # A run that ended before the kill point (it cannot here: the
                # point is within the first pass) would simply be run again.
                if killed or point is None:
                    break
            if point is None:
                break
        elapsed = time.monotonic() - t0
        final_code = runs[-1][0]
        stats = mock.stats()
        problems, figures = verify(work, orders, binary)
        if final_code not in (0, 1):
            problems.append(f"last run exited {final_code}")
        kills = sum(1 for r in runs if r[1])
        if kills != args.kills:
            problems.append(f"{kills} SIGKILLs, wanted {args.kills}")
        print(f"soak: {len(runs)} runs ({kills} SIGKILLed) in {elapsed:.0f} s; last exit {final_code}")
        print(f"soak: server saw {stats['payprotocol_detail_requests']} detail requests, "
              f"{stats['faults_injected']} faults, {stats['throttled']} throttled, "
              f"busiest second {stats['max_requests_in_any_1s_window']}")
        for k, v in figures.items():
            print(f"soak: {k}: {v}")
        for p in problems[:50]:
            print(f"soak: FAIL: {p}")
        ok = not problems
        print("soak: PASS" if ok else f"soak: FAIL ({len(problems)} problems)")
    finally:
        mock.stop()
        log.close()
        if ok and not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"soak: work directory kept: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
