"""DuckDB reads paysync's outputs: Parquet, zstd JSONL and gzip CSV are compared,
value by value, with a plain JSONL output of the same orders.

Usage: duckdb_check.py PLAIN.jsonl FILE.parquet FILE.jsonl.zst FILE.csv.gz
Used by tests/e2e/warehouse.rs (duckdb_reads_every_format). The runs differ in
when they happened, so paysync's own times (observed_at, first_seen_at) are
checked for type only; every other column must be equal.
"""
import datetime as dt
import sys

import duckdb

OWN_TIMES = {"observed_at", "first_seen_at"}
TIMES = {"created_at", "paid_at"} | OWN_TIMES
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def rows(con, sql):
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return {r[names.index("order_no")]: dict(zip(names, r)) for r in cur.fetchall()}


def norm_time(v):
    if v is None or v == "":
        return None
    if isinstance(v, str):
        v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    return v.astimezone(dt.timezone.utc)


def unescape(v):
    if isinstance(v, str) and len(v) > 1 and v[0] == "'" and v[1] in "".join(FORMULA_START):
        return v[1:]
    return v


def main(plain, parquet, jsonl_zst, csv_gz):
    con = duckdb.connect()
    # Plain JSONL, every value as text (no type guessing), input as JSON text.
    want = rows(con, f"SELECT * FROM read_json('{plain}', format='newline_delimited', "
                     f"records=true, union_by_name=true, convert_strings_to_integers=false)")
    got_pq = rows(con, f"SELECT * FROM read_parquet('{parquet}')")
    got_zst = rows(con, f"SELECT * FROM read_json('{jsonl_zst}', format='newline_delimited', "
                        f"compression='zstd')")
    got_csv = rows(con, f"SELECT * FROM read_csv('{csv_gz}', all_varchar=true, header=true, "
                        f"compression='gzip', quote='\"', escape='\"')")
    types = {r[0]: r[1] for r in con.execute(
        f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{parquet}'))").fetchall()}
    assert types["observed_at"] == "TIMESTAMP WITH TIME ZONE", types
    assert types["settled"] == "BOOLEAN", types
    assert types["polls"] == "BIGINT", types
    assert types["amount"] == "VARCHAR", types
    assert types["input"].startswith("STRUCT("), types

    checked = 0
    for name, got in (("parquet", got_pq), ("jsonl.zst", got_zst), ("csv.gz", got_csv)):
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want)))
        for order, w in want.items():
            g = got[order]
            for col, wv in w.items():
                if col == "input":
                    wi = {k: v for k, v in (wv or {}).items()}
                    if name == "csv.gz":
                        gi = {k[len("input."):]: unescape(v) for k, v in g.items() if k.startswith("input.")}
                    else:
                        gi = dict(g["input"])
                    assert gi == wi, (name, order, gi, wi)
                    continue
                gv = g[col]
                if name == "csv.gz":
                    gv = unescape(gv)
                if col in TIMES:
                    if col in OWN_TIMES:
                        assert norm_time(gv) is not None, (name, order, col, gv)
                    else:
                        assert norm_time(gv) == norm_time(wv), (name, order, col, gv, wv)
                    continue
                if name == "csv.gz":
                    wv = "" if wv is None else (str(wv).lower() if isinstance(wv, bool) else str(wv))
                    gv = "" if gv is None else gv
                assert gv == wv, (name, order, col, gv, wv)
                checked += 1
    # Amounts are exact: DECIMAL(38, 18) casts agree between Parquet and JSONL.
    diff = con.execute(
        f"SELECT count(*) FROM read_parquet('{parquet}') p JOIN read_json('{plain}') j USING (order_no) "
        f"WHERE CAST(p.amount AS DECIMAL(38, 18)) IS DISTINCT FROM CAST(j.amount AS DECIMAL(38, 18))").fetchone()[0]
    assert diff == 0, diff
    print(f"duckdb: all values match ({len(want)} orders, {checked} values)")


if __name__ == "__main__":
    main(*sys.argv[1:5])
