#!/usr/bin/env python3
"""The peer: what a user might write instead of paysync.

Reads an order CSV, fetches each order's PayProtocol payment detail once, and writes
one JSON line per order. Standard library only, asyncio with a semaphore that bounds
the requests in flight, and one of two HTTP clients (--client):

- streams (default): asyncio streams speaking HTTP/1.1 with keep-alive, and a small
  pool of connections (one per in-flight request at most). The careful version.
- urllib: urllib.request.urlopen run in asyncio's default thread pool
  (asyncio.to_thread), one connection per request. What the standard library
  offers out of the box, and the way most scripts are written.
- httpclient: http.client.HTTPConnection in a thread pool of `concurrency` threads,
  each thread keeping its own keep-alive connection. The standard library's HTTP
  client used with connection reuse, without writing HTTP by hand.

Signing follows the PayProtocol spec: X-PAY-SIGN = base64(HMAC-SHA256(secret,
timestamp + METHOD + path?query + body)), with X-PAY-KEY and X-PAY-TIMESTAMP.
Amounts in base units are scaled by the currency's decimals from
GET /conf/list/currency (fetched once).

Usage:
  peer.py --base-url http://127.0.0.1:PORT/api/mer --input orders.csv --output out.jsonl
          [--column order_no] [--concurrency 64] [--api-key demo-key]
          [--client streams|urllib|httpclient] [--cafile CA.pem]
The secret comes from $PAYSYNC_API_SECRET (default "demo-secret"). An https base URL
is spoken over TLS (the ssl module, HTTP/1.1: the standard library has no HTTP/2),
trusting --cafile as well as the system's roots.
"""

import argparse
import asyncio
import base64
import concurrent.futures
import csv
import decimal
import hashlib
import hmac
import http.client
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

STATUS = {0: "paid", 1: "pending", 2: "confirming", 3: "partially_paid",
          4: "failed", 5: "refunded"}
MAX_ATTEMPTS = 3  # per order: a bounded retry on connection errors, 429 and 5xx


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host, port, tls):
        self.host, self.port, self.tls = host, port, tls
        self.reader = self.writer = None

    async def request(self, target, headers):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls)
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        hdrs = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            body = await self.reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            self.close()
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Client:
    """Signed GETs with a bounded retry, over asyncio streams (keep-alive)."""

    def __init__(self, base_url, api_key, secret, concurrency, cafile=None):
        u = urllib.parse.urlsplit(base_url)
        self.scheme = u.scheme
        default_port = 443 if u.scheme == "https" else 80
        self.host, self.port, self.prefix = u.hostname, u.port or default_port, u.path.rstrip("/")
        self.tls = None
        if u.scheme == "https":
            self.tls = ssl.create_default_context()
            if cafile:
                self.tls.load_verify_locations(cafile)
        self.api_key, self.secret = api_key, secret.encode()
        self.pool = asyncio.Queue()
        for _ in range(concurrency):
            self.pool.put_nowait(Conn(self.host, self.port, self.tls))

    async def request(self, target):
        conn = await self.pool.get()
        try:
            return await conn.request(target, self.signed_headers(target))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            conn.close()
            raise
        finally:
            self.pool.put_nowait(conn)

    def signed_headers(self, target):
        ts = str(int(time.time()))
        mac = hmac.new(self.secret, (ts + "GET" + target).encode(), hashlib.sha256)
        return {"X-PAY-KEY": self.api_key, "X-PAY-TIMESTAMP": ts,
                "X-PAY-SIGN": base64.b64encode(mac.digest()).decode()}

    async def get(self, path, query):
        target = self.prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                status, body = await self.request(target)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                status, body = None, str(e).encode()
            if status is not None and status != 429 and status < 500:
                return status, body
            if attempt < MAX_ATTEMPTS:
                await asyncio.sleep(0.5 * attempt)
        return status, body


class UrllibClient(Client):
    """The same client over urllib.request in asyncio's thread pool."""

    def __init__(self, base_url, api_key, secret, concurrency, cafile=None):
        super().__init__(base_url, api_key, secret, 0, cafile)
        self.origin = f"{self.scheme}://{self.host}:{self.port}"

    def fetch(self, target):
        req = urllib.request.Request(self.origin + target, headers=self.signed_headers(target))
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.tls) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    async def request(self, target):
        return await asyncio.to_thread(self.fetch, target)


class HttpClientClient(Client):
    """The same client over http.client, one keep-alive connection per pool thread."""

    def __init__(self, base_url, api_key, secret, concurrency, cafile=None):
        super().__init__(base_url, api_key, secret, 0, cafile)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
        self.local = threading.local()

    def fetch(self, target):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            if self.tls is not None:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=30,
                                                   context=self.tls)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            self.local.conn = conn
        try:
            conn.request("GET", target, headers=self.signed_headers(target))
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            raise OSError("connection failed") from None

    async def request(self, target):
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.fetch, target)


def scale(base_units, decimals):
    if base_units is None or decimals is None:
        return None
    return str(decimal.Decimal(base_units).scaleb(-decimals))


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--column", default="order_no")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--api-key", default="demo-key")
    ap.add_argument("--client", choices=["streams", "urllib", "httpclient"], default="streams")
    ap.add_argument("--cafile", help="a PEM CA to trust for an https base URL")
    args = ap.parse_args()
    kind = {"streams": Client, "urllib": UrllibClient, "httpclient": HttpClientClient}[args.client]
    client = kind(args.base_url, args.api_key,
                  os.environ.get("PAYSYNC_API_SECRET", "demo-secret"), args.concurrency,
                  args.cafile)

    decimals = {}
    status, body = await client.get("/conf/list/currency", None)
    if status == 200:
        for c in json.loads(body).get("data") or []:
            decimals[(c["chainId"], c["symbol"])] = c["decimals"]

    sem = asyncio.Semaphore(args.concurrency)
    counts = {}
    failed = 0

    with open(args.input, newline="") as f, open(args.output, "w") as out:
        async def fetch(row):
            nonlocal failed
            try:
                order = row[args.column]
                status, body = await client.get("/payment/detail", {"outTradeNo": order})
                rec = {"order_no": order, "observed_at": time.time(), "input": row}
                if status == 200:
                    data = json.loads(body).get("data") or {}
                    code = data.get("paymentStatus")
                    rec["status"] = STATUS.get(code, "unknown") if data else "not_found"
                    rec["provider_status"] = code
                    dec = decimals.get((data.get("chainId"), data.get("settlementCurrencySymbol")))
                    rec["amount"] = scale(data.get("settlementAmount"), dec)
                    rec["expected_amount"] = scale(data.get("expectedAmount"), dec)
                    rec["currency"] = data.get("settlementCurrencySymbol")
                    rec["detail"] = data
                elif status == 404:
                    rec["status"] = "not_found"
                else:
                    rec["status"] = "error"
                    rec["error"] = f"HTTP {status}: {body[:200].decode(errors='replace')}"
                    failed += 1
                counts[rec["status"]] = counts.get(rec["status"], 0) + 1
                out.write(json.dumps(rec) + "\n")
            finally:
                sem.release()

        tasks = set()
        for row in csv.DictReader(f):
            await sem.acquire()  # at most `concurrency` orders in flight
            t = asyncio.create_task(fetch(row))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        out.flush()
        os.fsync(out.fileno())

    print(json.dumps({"orders": sum(counts.values()), "counts": counts, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
