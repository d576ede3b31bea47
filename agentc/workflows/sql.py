"""SQL workflow: answer questions about, and make changes to, a shop's SQLite database.

In the style of AgentBench's DB tasks. Every task gets its own in-memory database generated from
the task's seed (workflows/sql_shop.py: about a thousand rows, table and column names that change
from task to task), so the agent has to explore the schema before it can query it. Tools:
list_tables, describe_table, run_sql. Sixteen question families, four of which modify data.

Gold answers are computed in plain Python from the generated rows, never by running the teacher's
SQL, so the checker really tests the teacher. Modifying tasks are scored by hashing every table of
the final database against a hash of the expected rows.
"""
from __future__ import annotations

import datetime as dt
import functools
import random
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

from agentc.workflows.base import (Answer, Call, Environment, Mistake, Resample, Task, ToolError, Verdict, Workflow,
                                   check_value, draw_family, stable_hash, tool)
from agentc.workflows.phrasing import Phrasing
from agentc.workflows.sql_shop import (COLUMN_NAMES, LAST_DAY, MONTH_NAMES, STATUSES, TABLE_NAMES, Customer, Shop,
                                       build_shop, entity_pool, iso, long_date, state_hash)

# ----------------------------------------------------------------------------- environment

MAX_ROWS = 30                   # rows shown by run_sql; the rest is summarised
STEP_BUDGET = 5_000_000         # SQLite VM instructions per query (~0.1 s); stops runaway queries
# Everything else (ATTACH/DETACH, schema changes, transactions, PRAGMA writes) is refused. A PRAGMA
# runs when it only reads a setting (no argument) or is one of the schema pragmas taking a table name.
ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE,
                   sqlite3.SQLITE_DELETE, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
READ_PRAGMAS = {"table_info", "table_xinfo", "foreign_key_list", "index_list", "index_info", "table_list"}


def _cell(v) -> str:
    """One value as run_sql shows it: floats at 2 decimals, so money reads as it is answered."""
    if isinstance(v, float):
        return f"{v:.2f}"
    return "NULL" if v is None else "<blob>" if isinstance(v, bytes) else str(v)


class SqlEnv(Environment):
    def __init__(self, shop: Shop):
        self.shop = shop
        self.conn = sqlite3.connect(":memory:", isolation_level=None)  # autocommit: each statement commits
        rows = shop.schema.project(shop.tables)
        self.conn.execute("BEGIN")
        for t, cs in shop.schema.cols.items():
            name = shop.schema.t[t]
            self.conn.execute(f"CREATE TABLE {name} ({', '.join(f'{c} {decl}' for _, c, decl in cs)})")
            self.conn.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(cs))})", rows[name])
        self.conn.execute("COMMIT")
        self.conn.set_authorizer(self._authorize)
        self._steps = 0

    def _authorize(self, action, arg1, arg2, db, trigger):
        pragma_ok = action == sqlite3.SQLITE_PRAGMA and (arg2 is None or arg1.lower() in READ_PRAGMAS)
        return sqlite3.SQLITE_OK if action in ALLOWED_ACTIONS or pragma_ok else sqlite3.SQLITE_DENY

    def _tick(self) -> int:
        self._steps += 1000
        return int(self._steps > STEP_BUDGET)

    def _table_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]

    @tool
    def list_tables(self) -> str:
        """List the tables of the database, one per line."""
        return "\n".join(self._table_names())

    @tool
    def describe_table(self, table: str) -> str:
        """Show a table's columns (name, type, primary and foreign keys) and its number of rows.

        Args:
            table: Name of the table, as given by list_tables.
        """
        names = {n.lower(): n for n in self._table_names()}
        if table.strip().lower() not in names:
            raise ToolError(f"no table named '{table}'. Tables: {', '.join(names.values())}.")
        name = names[table.strip().lower()]
        fks = {r[3]: f"{r[2]}({r[4]})" for r in self.conn.execute(f"PRAGMA foreign_key_list({name})")}
        lines = [f"Table {name} ({self.conn.execute(f'SELECT COUNT(*) FROM {name}').fetchone()[0]} rows)"]
        for _, col, typ, _, _, pk in self.conn.execute(f"PRAGMA table_info({name})"):
            lines.append(f"  {col} {typ}" + (" PRIMARY KEY" if pk else "") +
                         (f" REFERENCES {fks[col]}" if col in fks else ""))
        return "\n".join(lines)

    @tool
    def run_sql(self, query: str) -> str:
        """Execute one SQL statement (SQLite dialect) and show its result.

        A SELECT returns a text table: a header line, then one line per row, with columns separated
        by " | " (at most 30 rows are shown). INSERT, UPDATE and DELETE are committed and report
        how many rows they changed.

        Args:
            query: Exactly one SQL statement.
        """
        if not query.strip().rstrip(";").strip():
            raise ToolError("the query is empty")
        self._steps = 0
        self.conn.set_progress_handler(self._tick, 1000)
        try:
            cur = self.conn.execute(query)
            rows = cur.fetchall() if cur.description else []
        except sqlite3.ProgrammingError as e:
            if "one statement" in str(e):
                raise ToolError("run_sql executes exactly one statement; send them one call at a time") from None
            raise ToolError(str(e)) from None
        except sqlite3.Error as e:
            if self._steps > STEP_BUDGET:
                raise ToolError("query took too long and was stopped; add filters or avoid cross joins") from None
            if "authoriz" in str(e):  # "not authorized" / "authorization denied"
                raise ToolError("statement not allowed: only SELECT, INSERT, UPDATE, DELETE and read-only "
                                "PRAGMAs run here (no ATTACH/DETACH, schema changes or transactions)") from None
            raise ToolError(f"SQLite error: {e}") from None
        finally:
            self.conn.set_progress_handler(None, 0)
        if not cur.description:
            n = max(cur.rowcount, 0)
            return f"OK: {n} {'row' if n == 1 else 'rows'} affected."
        lines = [" | ".join(d[0] for d in cur.description)]
        lines += [" | ".join(map(_cell, r)) for r in rows[:MAX_ROWS]]
        if not rows:
            lines.append("(no rows)")
        elif len(rows) > MAX_ROWS:
            lines.append(f"(... {len(rows) - MAX_ROWS} more rows)")
        return "\n".join(lines)

    def close(self) -> None:
        self.conn.close()

    def interrupt(self) -> None:
        self.conn.interrupt()  # sqlite3 allows this one call from any thread

    def state_hash(self) -> str:
        return state_hash({t: self.conn.execute(f"SELECT * FROM {t}").fetchall() for t in self._table_names()})


# ----------------------------------------------------------------------------- question families
# One function per family: it draws parameters from the task rng, computes the gold from the Python
# rows, and returns the teacher's plan (SQL steps written against logical names, resolved to this
# shop's names). Placeholders: {table}, {table.field}, {@snippet}, keywords, and {cid}/{catid},
# which the teacher fills from an earlier observation.

SNIPPETS = {
    "revenue": "SUM(i.{order_items.qty} * i.{order_items.price})",
    "orders_items": "{orders} o JOIN {order_items} i ON i.{order_items.order} = o.{orders.id}",
    "items_products": " JOIN {products} p ON p.{products.id} = i.{order_items.product}",
    "live": "o.{orders.status} <> 'cancelled'",
}


@dataclass
class Step:
    sql: str
    whys: tuple[str, ...]   # alternative reasonings; the teacher picks one
    bind: str = ""          # keep the first value of the result under this name for later steps


@dataclass
class Spec:
    params: dict            # fills the question template; kept in Task.params
    gold: dict
    tables: list[str]       # logical tables the teacher describes
    steps: list[Step]
    answer: str = "cell"    # "cell", "column", "top3", or a "Done: ..." format over the bound values


def number(v) -> dict:
    return {"kind": "number", "value": v}


def money(cents: int) -> dict:
    return {"kind": "number", "value": cents / 100, "tol": 0.005}  # answers are given to the cent


def state(x: Ctx, **changed: list) -> dict:
    """Gold of a modifying task: the hash of every table once `changed` replaces the original rows."""
    return {"kind": "state", "hash": state_hash(x.s.project(x.shop.tables | changed))}


class Ctx:
    """What a family function works with: the task rng, the shop, this split's pools, helpers."""

    def __init__(self, rng: random.Random, shop: Shop, split: str, test_share: float):
        self.rng, self.shop, self.s = rng, shop, shop.schema
        self.split, self.test_share = split, test_share

    def pool(self, name: str) -> tuple:
        """Entity values come from the shop's pools (which may hold invented names), numbers and
        dates from the split's."""
        return self.shop.pools.get(name) or entity_pool(name, self.split, self.test_share)

    def resample(self):
        raise Resample

    def shuffled(self, values) -> list:
        values = list(values)
        self.rng.shuffle(values)
        return values

    def step(self, sql: str, *whys: str, bind: str = "", **kw) -> Step:
        expand = functools.partial(re.sub, r"\{@(\w+)\}", lambda m: SNIPPETS[m.group(1)])
        return Step(self.s.fmt(expand(sql), **kw), tuple(self.s.fmt(w, **kw) for w in whys), bind)

    def cats(self, *tables: str) -> list[str]:
        return list(tables) + (["categories"] if self.s.category_table else [])

    def find_customer(self, c: Customer) -> Step:
        return self.step("SELECT {customers.id}, {customers.city} FROM {customers} WHERE {cond}",
                         "First I need {name}'s id from {customers}.",
                         "Let me look up {name} in {customers} to get the id.",
                         "I'll find the {customers.id} of {name} before touching the orders.",
                         bind="cid", cond=self.s.name_filter(c.first, c.last), name=c.full)

    def peek_dates(self) -> Step:
        return self.step(self.rng.choice(["SELECT {orders.date} FROM {orders} LIMIT 3", "SELECT MIN({orders.date}) "
                                          "AS first, MAX({orders.date}) AS last FROM {orders}"]),
                         "Before filtering on dates I want to see how {orders.date} is stored.",
                         "Let me peek at {orders.date} to check the date format.")

    def peek_statuses(self) -> Step:
        return self.step("SELECT {orders.status}, COUNT(*) AS n FROM {orders} GROUP BY {orders.status}",
                         "Let me check which values {orders.status} takes.",
                         "I'll look at the distinct {orders.status} values first so I match them exactly.")

    def year_cond(self, year) -> str:
        col = f"o.{self.s.col['orders', 'date']}"
        return self.rng.choice([f"{col} BETWEEN '{year}-01-01' AND '{year}-12-31'",
                                f"strftime('%Y', {col}) = '{year}'", f"{col} LIKE '{year}-%'"])


def city_count(x: Ctx) -> Spec:
    city = x.rng.choice(sorted({c.city for c in x.shop.customers}))
    return Spec({"city": city}, number(sum(c.city == city for c in x.shop.customers)), ["customers"], [
        x.step("SELECT COUNT(*) AS n FROM {customers} WHERE {customers.city} = '{city}'",
               "{customers} has a {customers.city} column, so I'll count the rows where it is {city}.",
               "Counting the rows of {customers} with {customers.city} = '{city}' answers this.", city=city)])


def customer_spend(x: Ctx) -> Spec:
    c = x.rng.choice([c for c in x.shop.customers if x.shop.spend[c.id]] or x.resample())
    return Spec({"customer": c.full}, money(x.shop.spend[c.id]), ["customers", "orders", "order_items"], [
        x.find_customer(c),
        x.step("SELECT ROUND({@revenue}, 2) AS total_spent FROM {@orders_items} "
               "WHERE o.{orders.customer} = {cid} AND {@live}",
               "{orders} links to {customers} through {orders.customer} and {order_items} to {orders} through "
               "{order_items.order}, so I'll join them and sum {order_items.qty} times {order_items.price}, "
               "skipping cancelled orders.",
               "Each line of {order_items} has {order_items.qty} and {order_items.price}; I'll sum their product "
               "over this customer's orders that are not cancelled.")])


def top_category(x: Ctx) -> Spec:
    for year in x.shuffled(x.pool("year")):
        revenue = Counter()
        for o in x.shop.orders:
            if o.status != "cancelled" and o.date.startswith(str(year)):
                for i in x.shop.lines[o.id]:
                    revenue[x.shop.product[i.product].category] += i.qty * i.cents
        (best, r1), (_, r2) = (revenue.most_common(2) + [(None, 0)] * 2)[:2]
        if r1 > r2:
            break
    else:
        raise Resample
    return Spec({"year": year}, {"kind": "text", "value": best}, x.cats("orders", "order_items", "products"), [
        x.peek_dates(),
        x.step("SELECT {cat} AS category, ROUND({@revenue}, 2) AS revenue FROM {@orders_items}{@items_products}"
               "{cat_join} WHERE {@live} AND {cond} GROUP BY {cat} ORDER BY revenue DESC LIMIT 3",
               "Revenue per category means joining {order_items} to {products} for the category and to {orders} "
               "for the date and status, then summing {order_items.qty} times {order_items.price}.",
               "I'll group the non-cancelled {year} order lines by category and sort by their revenue.",
               cond=x.year_cond(year), year=year)])


def month_orders(x: Ctx) -> Spec:
    month = x.rng.choice(x.pool("month"))
    n = sum(o.date.startswith(month) for o in x.shop.orders)
    if not n:
        raise Resample
    label = f"{MONTH_NAMES[int(month[5:]) - 1]} {month[:4]}"
    col = x.s.col["orders", "date"]
    cond = x.rng.choice([f"{col} LIKE '{month}-%'", f"strftime('%Y-%m', {col}) = '{month}'"])
    return Spec({"month": label}, number(n), ["orders"], [
        x.peek_dates(),
        x.step("SELECT COUNT(*) AS n FROM {orders} WHERE {cond}",
               "Dates are ISO text, so I can count the orders whose {orders.date} falls in {month}.",
               "{label} is {month} in this format; I'll count the orders from that month.",
               cond=cond, month=month, label=label)])


def top_customer(x: Ctx) -> Spec:
    cities = x.shuffled(sorted({c.city for c in x.shop.customers}))[:4]
    for city in (cities + [None] if x.rng.random() < 0.6 else [None] + cities):
        counts = sorted(((len(x.shop.orders_of[c.id]), c.full) for c in x.shop.customers
                         if city in (None, c.city)), reverse=True) + [(0, "")]
        if counts[0][0] > counts[1][0]:
            break
    else:
        raise Resample
    where = x.s.fmt(" WHERE c.{customers.city} = '{city}'", city=city) if city else ""
    return Spec({"where": f" from {city}" if city else "", "city": city}, {"kind": "text", "value": counts[0][1]},
                ["customers", "orders"], [
        x.step("SELECT {cname} AS customer, COUNT(*) AS n_orders FROM {customers} c JOIN {orders} o "
               "ON o.{orders.customer} = c.{customers.id}{where} GROUP BY c.{customers.id} "
               "ORDER BY n_orders DESC LIMIT 3",
               "{orders}.{orders.customer} points to {customers}, so I'll count orders per customer and sort.",
               "I'll join {customers} with {orders}, group by customer and take the largest count; showing the "
               "runners-up tells me whether there is a tie.", where=where)])


def avg_price(x: Ctx) -> Spec:
    for category in x.shuffled(x.shop.categories):
        cents = [p.cents for p in x.shop.products if p.category == category]
        total, n = sum(cents), len(cents)
        if 2 * (total % n) != n:   # an exact half cent would make the rounding ambiguous
            break
    else:
        raise Resample
    return Spec({"category": category}, money((2 * total + n) // (2 * n)), x.cats("products"), [
        x.step("SELECT ROUND(AVG(p.{products.price}), 2) AS avg_price FROM {products} p{cat_join} "
               "WHERE {cat} = '{category}'",
               "I'll average {products.price} over the {category} products.",
               "The average of {products.price} for the category {category}, rounded to the cent, is one query.",
               category=category)])


def status_count(x: Ctx) -> Spec:
    status = x.rng.choice(STATUSES)
    c = x.rng.choice([c for c in x.shop.customers if any(o.status == status for o in x.shop.orders_of[c.id])]
                     or x.resample())
    return Spec({"customer": c.full, "status": status},
                number(sum(o.status == status for o in x.shop.orders_of[c.id])), ["customers", "orders"], [
        x.find_customer(c), x.peek_statuses(),
        x.step("SELECT COUNT(*) AS n FROM {orders} WHERE {orders.customer} = {cid} AND {orders.status} = '{status}'",
               "Now I count this customer's orders with {orders.status} = '{status}'.",
               "With the id I can count the matching rows of {orders} directly.", status=status)])


def never_ordered(x: Ctx) -> Spec:
    city = x.rng.choice(sorted({c.city for c in x.shop.customers})) if x.rng.random() < 0.5 else None
    n = sum(not x.shop.orders_of[c.id] for c in x.shop.customers if city in (None, c.city))
    if not n:
        raise Resample
    sql = x.rng.choice([
        "SELECT COUNT(*) AS n FROM {customers} c WHERE NOT EXISTS (SELECT 1 FROM {orders} o "
        "WHERE o.{orders.customer} = c.{customers.id}){and_city}",
        "SELECT COUNT(*) AS n FROM {customers} c LEFT JOIN {orders} o ON o.{orders.customer} = c.{customers.id} "
        "WHERE o.{orders.id} IS NULL{and_city}",
        "SELECT COUNT(*) AS n FROM {customers} c WHERE c.{customers.id} NOT IN "
        "(SELECT {orders.customer} FROM {orders}){and_city}"])
    and_city = x.s.fmt(" AND c.{customers.city} = '{city}'", city=city) if city else ""
    return Spec({"where": f" from {city}" if city else "", "city": city}, number(n), ["customers", "orders"], [
        x.step(sql, "Customers without orders have no row in {orders} pointing at them, so this is an anti-join.",
               "I'll count the {customers} rows that no {orders}.{orders.customer} refers to.", and_city=and_city)])


def top3_products(x: Ctx) -> Spec:
    for year in x.shuffled(x.pool("year")) + [None]:
        sold = Counter()
        for o in x.shop.orders:
            if o.status != "cancelled" and (year is None or o.date.startswith(str(year))):
                for i in x.shop.lines[o.id]:
                    sold[i.product] += i.qty
        q = [n for _, n in sold.most_common(4)] + [0] * 4
        if q[0] > q[1] > q[2] > q[3]:   # a strict ranking, so the ordered list is unambiguous
            break
    else:
        raise Resample
    cond = f" AND {x.year_cond(year)}" if year else ""
    rank = x.step("SELECT p.{products.name} AS product, SUM(i.{order_items.qty}) AS units FROM {@orders_items}"
                  "{@items_products} WHERE {@live}{cond} GROUP BY p.{products.id} ORDER BY units DESC LIMIT 5",
                  "I'll sum {order_items.qty} per product over non-cancelled orders and sort; a few extra rows "
                  "show whether third place is tied.",
                  "Units sold come from {order_items}.{order_items.qty}; joining {orders} filters status and "
                  "date, and {products} gives the names.", cond=cond)
    return Spec({"period": f"in {year}" if year else "of all time", "year": year},
                {"kind": "list", "value": [x.shop.product[p].name for p, _ in sold.most_common(3)], "ordered": True},
                ["orders", "order_items", "products"], [*([x.peek_dates()] if year else []), rank], answer="top3")


def more_than_k(x: Ctx) -> Spec:
    counts = [len(v) for v in x.shop.orders_of.values()]
    for k in x.shuffled(x.pool("more_than")):
        if n := sum(c > k for c in counts):
            break
    else:
        raise Resample
    return Spec({"k": k}, number(n), ["orders"], [
        x.step("SELECT COUNT(*) AS n FROM (SELECT {orders.customer} FROM {orders} GROUP BY {orders.customer} "
               "HAVING COUNT(*) > {k})",
               "I'll group {orders} by {orders.customer}, keep the groups with more than {k} rows and count them.",
               "A GROUP BY with HAVING COUNT(*) > {k} on {orders}, wrapped in a count, gives the number.", k=k)])


def low_stock(x: Ctx) -> Spec:
    for category, limit in zip(x.shuffled(x.shop.categories) * 3, x.shuffled(x.pool("stock"))):
        names = sorted(p.name for p in x.shop.products if p.category == category and p.stock < limit)
        if 1 <= len(names) <= 6:
            break
    else:
        raise Resample
    pick = x.step("SELECT p.{products.name} AS product, p.{products.stock} AS stock FROM {products} p{cat_join} "
                  "WHERE {cat} = '{category}' AND p.{products.stock} < {limit} ORDER BY p.{products.name}",
                  "I'll filter {products} on the category and {products.stock} < {limit}.",
                  "The stock level is in {products}.{products.stock}; I'll list the {category} products below "
                  "{limit}.", category=category, limit=limit)
    return Spec({"category": category, "n": limit}, {"kind": "list", "value": names, "ordered": False},
                x.cats("products"), [pick], answer="column")


def revenue_between(x: Ctx) -> Spec:
    month = x.rng.choice(x.pool("month"))
    first = dt.date.fromisoformat(f"{month}-{x.rng.randint(1, 28):02d}").toordinal()
    # Both ends are dates of this split's months, so no test question names a train month.
    ends = [d for d in range(first + 10, min(LAST_DAY, first + 60) + 1) if iso(d)[:7] in x.pool("month")]
    if not ends:
        raise Resample
    start, end = iso(first), iso(x.rng.choice(ends))
    cents = sum(x.shop.order_cents(o) for o in x.shop.orders if o.status != "cancelled" and start <= o.date <= end)
    if not cents:
        raise Resample
    return Spec({"start": start, "end": end, "start_long": long_date(start), "end_long": long_date(end)},
                money(cents), ["orders", "order_items"], [
        x.peek_dates(),
        x.step("SELECT ROUND({@revenue}, 2) AS revenue FROM {@orders_items} WHERE {@live} "
               "AND o.{orders.date} BETWEEN '{start}' AND '{end}'",
               "ISO dates compare correctly as text, so BETWEEN '{start}' AND '{end}' keeps both ends.",
               "I'll join {orders} to {order_items} and sum {order_items.qty} times {order_items.price} for "
               "non-cancelled orders in the date range.", start=start, end=end)])


def raise_prices(x: Ctx) -> Spec:
    for category, pct in zip(x.shuffled(x.shop.categories) * 3, x.shuffled(x.pool("percent"))):
        hundredths = [p.cents * (100 + pct) for p in x.shop.products if p.category == category]
        if all(h % 100 != 50 for h in hundredths):   # no new price lands on an exact half cent
            break
    else:
        raise Resample
    raised = lambda cents: (cents * (100 + pct) + 50) // 100  # noqa: E731  (never a tie, see above)
    products = [p._replace(cents=raised(p.cents), price=raised(p.cents) / 100) if p.category == category else p
                for p in x.shop.products]
    price, factor = "{products.price}", f"{1 + pct / 100:.2f}"
    steps = [x.step("SELECT {categories.id} FROM {categories} WHERE {categories.name} = '{category}'",
                    "The category lives in {categories}, so I need the id of {category} first.",
                    bind="catid", category=category)] if x.s.category_table else []
    where = "{products.category_id} = {catid}" if x.s.category_table else "{products.category} = '{category}'"
    steps.append(x.step(f"UPDATE {{products}} SET {price} = ROUND({price} * {factor}, 2) WHERE {where}",
                        "A {pct}% raise multiplies {products.price} by {factor}; I'll round to 2 decimals.",
                        "One UPDATE on {products} does it: {products.price} times {factor}, rounded to the cent.",
                        bind="n", category=category, pct=pct, factor=factor))
    return Spec({"category": category, "pct": pct}, state(x, products=products), x.cats("products"), steps,
                answer="Done: {n:row} updated.")


def cancel_pending(x: Ctx) -> Spec:
    for month in x.shuffled(x.pool("month")):
        cutoff = f"{month}-01"
        pending = [o.date < cutoff for o in x.shop.orders if o.status == "pending"]
        if any(pending) and not all(pending):   # the date must matter
            break
    else:
        raise Resample
    orders = [o._replace(status="cancelled") if o.status == "pending" and o.date < cutoff else o
              for o in x.shop.orders]
    return Spec({"date": cutoff, "date_long": long_date(cutoff)}, state(x, orders=orders), ["orders"], [
        x.peek_statuses(), x.peek_dates(),
        x.step("UPDATE {orders} SET {orders.status} = 'cancelled' WHERE {orders.status} = 'pending' "
               "AND {orders.date} < '{cutoff}'",
               "Dates are ISO text, so {orders.date} < '{cutoff}' selects the older orders; I'll update the "
               "pending ones.",
               "One UPDATE on {orders}: pending and placed before {cutoff} becomes cancelled.",
               bind="n", cutoff=cutoff)],
                answer="Done: {n:order} cancelled.")


def add_customer(x: Ctx) -> Spec:
    taken = {(c.first, c.last) for c in x.shop.customers}
    first, last = x.rng.choice(x.pool("first")), x.rng.choice(x.pool("last"))
    if (first, last) in taken:
        raise Resample
    city, signup = x.rng.choice(x.pool("city")), f"{x.rng.choice(x.pool('month'))}-{x.rng.randint(1, 28):02d}"
    new = Customer(len(x.shop.customers) + 1, first, last, f"{first} {last}", city, signup, None)
    names = (["{customers.first}", "{customers.last}"], f"'{first}', '{last}'") if x.s.split_names \
        else (["{customers.full}"], f"'{first} {last}'")
    return Spec({"customer": new.full, "city": city, "date": signup, "date_long": long_date(signup)},
                state(x, customers=x.shop.customers + [new]), ["customers"], [
        x.step("SELECT COUNT(*) AS n FROM {customers} WHERE {cond}",
               "Let me make sure {name} is not already in {customers}.",
               "First a check that there is no existing row for {name}.",
               cond=x.s.name_filter(first, last), name=new.full),
        x.step(f"INSERT INTO {{customers}} ({', '.join(names[0])}, {{customers.city}}, {{customers.signup}}) "
               f"VALUES ({names[1]}, '{city}', '{signup}')",
               "Not there yet. {customers.id} is the primary key and fills itself, so I insert the other columns.",
               "No duplicate, so I'll insert the row and let the primary key be assigned.", bind="n")],
                answer="Done: {n:row} inserted.")


def delete_cancelled(x: Ctx) -> Spec:
    c = x.rng.choice([c for c in x.shop.customers if any(o.status == "cancelled" for o in x.shop.orders_of[c.id])]
                     or x.resample())
    gone = {o.id for o in x.shop.orders_of[c.id] if o.status == "cancelled"}
    orders = [o for o in x.shop.orders if o.id not in gone]
    items = [i for i in x.shop.tables["order_items"] if i.order not in gone]
    return Spec({"customer": c.full}, state(x, orders=orders, order_items=items),
                ["customers", "orders", "order_items"], [
        x.find_customer(c),
        x.step("DELETE FROM {order_items} WHERE {order_items.order} IN (SELECT {orders.id} FROM {orders} "
               "WHERE {orders.customer} = {cid} AND {orders.status} = 'cancelled')",
               "The lines go first, while their orders still identify them.",
               "I'll delete the {order_items} rows of those orders first, so no line is left pointing at nothing.",
               bind="lines"),
        x.step("DELETE FROM {orders} WHERE {orders.customer} = {cid} AND {orders.status} = 'cancelled'",
               "Now the cancelled orders themselves.", "And then the orders.", bind="n")],
                answer="Done: deleted {n:order} and {lines:order line}.")


class Family(NamedTuple):
    sample: Callable[[Ctx], Spec]
    modifies: bool
    templates: tuple[str, ...]


FAMILIES = {
    "city_count": Family(city_count, False, (
        "How many customers live in {city}?", "What is the number of customers based in {city}?",
        "Count the customers whose city is {city}.", "How many of our customers are located in {city}?")),
    "customer_spend": Family(customer_spend, False, (
        "How much has {customer} spent in total, excluding cancelled orders?",
        "What is the total amount {customer} paid across all orders that were not cancelled?",
        "Ignoring cancelled orders, what is {customer}'s total spend?",
        "Sum up the value (quantity times price paid) of {customer}'s orders, leaving out cancelled orders.")),
    "top_category": Family(top_category, False, (
        "Which product category brought in the most revenue in {year}, not counting cancelled orders?",
        "Excluding cancelled orders, what was the top-grossing category in {year}?",
        "In {year}, which category had the highest sales revenue (cancelled orders excluded)?")),
    "month_orders": Family(month_orders, False, (
        "How many orders were placed in {month}?", "What is the number of orders placed during {month}?",
        "Count the orders made in {month}.", "How many orders does the shop have from {month}?")),
    "top_customer": Family(top_customer, False, (
        "Which customer{where} has placed the most orders?",
        "Name the customer{where} with the largest number of orders.",
        "Who is our most frequent customer{where}, by number of orders?",
        "Find the customer{where} who placed the most orders.")),
    "avg_price": Family(avg_price, False, (
        "What is the average price of products in the {category} category? Round to 2 decimals.",
        "Give the mean price of {category} products, rounded to the cent.",
        "On average, how much does a {category} product cost (2 decimals)?")),
    "status_count": Family(status_count, False, (
        "How many of {customer}'s orders are {status}?", "How many orders by {customer} have the status {status}?",
        "Count {customer}'s orders whose status is {status}.",
        "What number of {customer}'s orders are marked {status}?")),
    "never_ordered": Family(never_ordered, False, (
        "How many customers{where} have never placed an order?", "Count the customers{where} with no orders at all.",
        "How many registered customers{where} have not ordered anything yet?")),
    "top3_products": Family(top3_products, False, (
        "What are the 3 best-selling products {period} by units sold, excluding cancelled orders? "
        "List them from most to least sold.",
        "List the top 3 products by quantity sold {period} (cancelled orders excluded), best first.",
        "Which three products sold the most units {period}, not counting cancelled orders? "
        "Order them by units sold.")),
    "more_than_k": Family(more_than_k, False, (
        "How many customers have placed more than {k} orders?", "Count the customers with more than {k} orders.",
        "How many customers ordered more than {k} times?",
        "What is the number of customers who have over {k} orders on record?")),
    "low_stock": Family(low_stock, False, (
        "Which products in the {category} category have fewer than {n} units in stock?",
        "List the {category} products whose stock is below {n}.",
        "Name every {category} product with a stock level under {n}.")),
    "revenue_between": Family(revenue_between, False, (
        "What was the total revenue from orders placed between {start} and {end} (both included), excluding "
        "cancelled orders?",
        "Excluding cancelled orders, how much revenue came from orders placed from {start} through {end}?",
        "How much did the non-cancelled orders placed between {start_long} and {end_long} (inclusive) bring in?")),
    "raise_prices": Family(raise_prices, True, (
        "Raise the price of every product in the {category} category by {pct}%, rounding to 2 decimals.",
        "Increase all {category} prices by {pct} percent (round the new prices to the cent).",
        "Apply a {pct}% price increase to the {category} category, rounding each new price to two decimals.",
        "Prices of {category} products go up {pct}%; update them, rounded to the nearest cent.")),
    "cancel_pending": Family(cancel_pending, True, (
        "Cancel every order that is still pending and was placed before {date}.",
        "Mark all pending orders placed before {date_long} as cancelled.",
        "Orders still pending from before {date} will never ship: set their status to cancelled.",
        "Set the status of pending orders dated earlier than {date} to cancelled.")),
    "add_customer": Family(add_customer, True, (
        "Add a new customer: {customer} from {city}, who signed up on {date}.",
        "Register {customer} (city: {city}) as a customer with a signup date of {date}.",
        "Insert a customer record for {customer}, living in {city}, who joined on {date_long}.",
        "We have a new customer, {customer} from {city}; they signed up on {date}. Please add them.")),
    "delete_cancelled": Family(delete_cancelled, True, (
        "Delete all of {customer}'s cancelled orders, together with their order lines.",
        "Remove {customer}'s cancelled orders and the line items that belong to them.",
        "Purge every cancelled order placed by {customer}, including its items.")),
}


# ----------------------------------------------------------------------------- teacher and checker

LIST_WHYS = ("First I'll see which tables this database has.", "Let me start by listing the tables.",
             "I don't know this schema yet, so I'll list the tables first.",
             "To begin, I'll check what tables exist.")
FIRST_DESCRIBE_WHYS = ("The relevant tables look like {tables}. I'll check the columns of {table} first.",
                       "I'll need {tables}. Let me describe {table} to see its columns.",
                       "{tables} should hold what I need; starting with {table}.")
ONLY_DESCRIBE_WHYS = ("Everything I need should be in {table}; let me see its columns.",
                      "{table} looks like the table for this. Let me check its columns.",
                      "I'll describe {table} before querying it.")
NEXT_DESCRIBE_WHYS = ("Now the columns of {table}.", "Next, {table}.", "And {table}.",
                      "Let me also look at {table} to see how it links to the rest.")
ANSWER_WHYS = {"cell": ("The query returned {v}.", "That gives {v}.", "So the answer is {v}.",
                        "The result is {v}, which answers the question."),
               "column": ("The query lists {n} matching products.", "That gives {n} rows; I'll list them.",
                          "{n} products match."),
               "top3": ("The first three rows are the answer, in order.",
                        "The top three are clear, with no tie for third.",
                        "Reading off the first three products in order."),
               "done": ("The change went through.", "The database confirms the change.", "That's applied.")}


TABLE_RECOVERY = ("There is no table {wrong} here; this database calls it {right}.",
                  "{wrong} does not exist. The table list shows {right}, so I'll use that.",
                  "Wrong name: the table is {right}, not {wrong}.")
COLUMN_RECOVERY = ("{wrong} is not a column here; the schema calls it {right}.",
                   "No column {wrong} in this database. describe_table showed {right}, so I'll use that.",
                   "Wrong column name: it is {right}, not {wrong}.")


# A look at one column of one table, without a filter (SqlWorkflow.lookaround).
PEEKS = (r"SELECT (?:DISTINCT )?(?P<c>\w+) FROM (?P<t>\w+)(?: LIMIT \d+)?",
         r"SELECT MIN\((?P<c>\w+)\)(?: AS \w+)?, MAX\((?P=c)\)(?: AS \w+)? FROM (?P<t>\w+)",
         r"SELECT (?P<c>\w+), COUNT\(\*\)(?: AS \w+)? FROM (?P<t>\w+) GROUP BY (?P=c)(?: ORDER BY .*)?")


def spell(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def result_rows(text: str) -> list[list[str]]:
    """The data rows of a run_sql text table (the header and notes dropped)."""
    return [line.split(" | ") for line in text.splitlines()[1:] if line and not line.startswith("(")]


def first_value(text: str) -> str:
    m = re.match(r"OK: (\d+) rows? affected", text)
    return m.group(1) if m else result_rows(text)[0][0]


def plural(n: str, word: str) -> str:
    return f"{n} {word}" + ("" if n == "1" else "s")


class SqlWorkflow(Workflow):
    name = "sql"
    instructions = """You are a database assistant for an online shop. Each shop keeps its data in a SQLite
database with its own table and column names, so explore the schema before writing SQL: list the
tables, then describe the ones you need. Run one statement per run_sql call. To answer a question,
query the data and reply with just the value: a number, a name, or a comma-separated list when
several items are asked for. When asked to change data, run the INSERT, UPDATE or DELETE statements
(changes are saved immediately) and reply with a short confirmation."""

    grammar = Phrasing({r"customers": ("clients", "shoppers"), r"customer": ("client", "shopper"),
                        r"placed": ("made",), r"(?<!sales )revenue": ("income",),
                        r"product": ("item",), r"marked": ("flagged", "listed as"), r"the status": ("the state",),
                        r"orders by": ("orders from", "orders placed by"), r"whose status is": ("with status",)},
                       number_slots=("k", "n", "pct"), date_slots=("date", "start", "end"),
                       protect=("pending", "shipped", "delivered", "cancelled"))   # status values, written as stored

    def __init__(self, test_share: float = 0.3, heldout_template_share: float = 0.25, mistake_rate: float = 0.0,
                 fault_rate: float = 0.0, invented: float = 0.5, phrasing: str = "rich"):
        """invented: share of made-up names, cities, categories and products mixed into the pools of
        train shops (sql_shop.shop_pools), so the policy learns to copy names instead of memorising
        them. Test shops never have any."""
        super().__init__(test_share, heldout_template_share, mistake_rate, fault_rate, phrasing)
        if not 0 <= invented < 1:
            raise ValueError(f"invented must be in [0, 1), got {invented}")
        self.invented = invented

    def _build(self, split: str, index: int, seed: int) -> tuple[Task, Spec]:
        shop = build_shop(seed, split, self.test_share, self.invented)
        rng = random.Random(seed)
        ctx = Ctx(rng, shop, split, self.test_share)
        family, spec = draw_family(rng, FAMILIES, lambda f: FAMILIES[f].sample(ctx), seed)
        task = self.make_task(rng, split, index, seed, family, FAMILIES[family].templates, spec.params, spec.gold,
                              family)
        return task, spec

    def sample_task(self, split: str, index: int, seed: int) -> Task:
        return self._build(split, index, seed)[0]

    def make_env(self, task: Task) -> SqlEnv:
        return SqlEnv(build_shop(task.seed, task.split, self.test_share, self.invented))

    def teacher(self, task: Task, env: SqlEnv):
        spec = self._build(task.split, task.index, task.seed)[1]
        schema, rng = env.shop.schema, random.Random(stable_hash("sql-teacher", task.seed))
        obs = yield Call("list_tables", {}, rng.choice(LIST_WHYS))
        tables = [schema.t[t] for t in spec.tables]
        if not set(tables) <= set(obs.text.split()):
            raise RuntimeError(f"list_tables does not show the tables the plan needs: {tables}")
        for n, table in enumerate(tables):
            whys = NEXT_DESCRIBE_WHYS if n else FIRST_DESCRIBE_WHYS if len(tables) > 1 else ONLY_DESCRIBE_WHYS
            why = rng.choice(whys).format(tables=spell(tables), table=table)
            distractors = [schema.t[t] for t in ("suppliers", "reviews") if t in schema.cols]
            if not n and distractors and rng.random() < 0.5:
                why += f" {spell(distractors)} {'is' if len(distractors) == 1 else 'are'} not needed here."
            yield Call("describe_table", {"table": table}, why)
        binds = {}
        for step in spec.steps:
            fill = functools.partial(re.sub, r"\{(\w+)\}", lambda m: binds[m.group(1)])
            obs = yield Call("run_sql", {"query": fill(step.sql)}, fill(rng.choice(step.whys)))
            if not obs.ok:
                raise RuntimeError(f"teacher query failed: {obs.text}")
            if step.bind:
                binds[step.bind] = first_value(obs.text)
        rows = result_rows(obs.text)
        if spec.answer in ("cell", "column", "top3"):  # "column": every row's first cell
            values = [r[0] for r in rows[:{"cell": 1, "top3": 3}.get(spec.answer)]]
            why = rng.choice(ANSWER_WHYS[spec.answer]).format(v=values[0], n=len(values))
            yield Answer(", ".join(values), why)
        else:
            text = re.sub(r"\{(\w+):([\w ]+)\}", lambda m: plural(binds[m.group(1)], m.group(2)), spec.answer)
            yield Answer(text, rng.choice(ANSWER_WHYS["done"]))

    def mistake(self, task: Task, env: SqlEnv, call: Call, rng: random.Random) -> Mistake | None:
        """The slip an agent makes on a schema it half knows: a table or column name another shop
        uses (`clients` where this one says `buyers`). SQLite rejects it before touching any row."""
        s = env.shop.schema
        tables = set(s.t.values())
        taken = tables | {c for cs in s.cols.values() for _, c, _ in cs}
        if call.tool == "describe_table":
            logical = next(t for t, name in s.t.items() if name == call.args["table"])
            wrong = [n for n, _ in TABLE_NAMES[logical] if n not in taken]
            if not wrong:
                return None
            w = rng.choice(wrong)
            fix = rng.choice(TABLE_RECOVERY).format(wrong=w, right=call.args["table"])
            return Mistake(Call("describe_table", {"table": w}, call.reasoning), fix)
        if call.tool != "run_sql":
            return None
        query, swaps = call.args["query"], []
        for t, name in s.t.items():
            if t in s.cols and re.search(rf"\b{name}\b", query):
                swaps += [(name, n, TABLE_RECOVERY) for n, _ in TABLE_NAMES[t] if n not in taken]
        for (t, f), name in s.col.items():
            if (t, f) in COLUMN_NAMES and re.search(rf"\b{name}\b", query):
                swaps += [(name, n, COLUMN_RECOVERY) for n in COLUMN_NAMES[t, f] if n not in taken]
        if not swaps:
            return None
        right, w, recovery = rng.choice(swaps)
        return Mistake(Call("run_sql", {"query": re.sub(rf"\b{right}\b", w, query, count=1)}, call.reasoning),
                       rng.choice(recovery).format(wrong=w, right=right))

    def lookaround(self, call: Call) -> str | None:
        """list_tables, describe_table, and a peek at one column without a filter: its first rows,
        its range, its distinct values or their counts (how the teacher checks date formats and
        status values)."""
        if call.tool == "list_tables":
            return "list"
        if call.tool == "describe_table":
            return f"describe:{str(call.args.get('table', '')).strip().lower()}"
        if call.tool != "run_sql":
            return None
        q = " ".join(str(call.args.get("query", "")).split()).rstrip(";").strip()
        for pattern in PEEKS:
            m = re.fullmatch(pattern, q, re.IGNORECASE)
            if m:
                return f"peek:{m.group('t').lower()}.{m.group('c').lower()}"
        return None

    def state_key(self, env: SqlEnv) -> str:
        return env.state_hash()

    def check(self, task: Task, env: SqlEnv, answer: str) -> Verdict:
        gold = task.gold
        if gold["kind"] == "state":
            ok = env.state_hash() == gold["hash"]
            return Verdict(ok, "" if ok else "the database does not end in the expected state")
        return check_value(gold, answer)


WORKFLOW = SqlWorkflow
