"""Shop workflow: find and buy the product a customer describes, WebShop-style.

Every task gets its own catalogue (about 60 products built from the task's seed: a noun, an
adjective, a material, a price, and color and size options). The agent sees it only through
search (a keyword ranking, ten results), view (one product's details and options) and buy (a
product with one value per option). The request names a kind of product, an attribute, a color,
a size and a budget. Success: a product was bought that matches every requirement (noun,
adjective, material when asked, price at most the budget) with the requested options, or, when
nothing in the catalogue matches, nothing was bought and the answer says so.

Splits: nouns, adjectives, materials and colors come from split pools, so a test request never
names a train catalogue's product kind, attribute or color. The deliberate mistake is an option
the product does not offer (a size it lacks), which buy refuses before anything is ordered.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from agentc.workflows.base import (Answer, Call, Environment, Mistake, Task, ToolError, Verdict, Workflow, split_pool,
                                   tool)
from agentc.workflows.phrasing import Phrasing

NOUNS = """backpack blanket boots cardigan desk_lamp duffel_bag gloves hoodie jacket jeans kettle
mug notebook pillow raincoat sandals scarf sneakers socks sweater teapot tent thermos towel
umbrella vest wallet watch beanie apron""".split()
ADJECTIVES = """lightweight waterproof insulated foldable breathable compact vintage handmade
organic padded reversible stretchy slim oversized quilted washable durable cozy""".split()
MATERIALS = "cotton wool leather linen canvas bamboo denim fleece nylon silk".split()
COLORS = "red blue green black white grey navy olive beige pink purple orange teal brown".split()
SIZES = ("XS", "S", "M", "L", "XL")
N_PRODUCTS = 60
RESULTS = 10


@functools.lru_cache(maxsize=None)
def pool(name: str, split: str, test_share: float) -> tuple:
    values = {"noun": NOUNS, "adjective": ADJECTIVES, "material": MATERIALS, "color": COLORS}[name]
    return tuple(split_pool(values, split, test_share, salt=f"shop-{name}"))


@dataclass
class Product:
    id: str
    noun: str
    adjective: str
    material: str
    cents: int
    colors: list[str]
    sizes: list[str]
    rating: float

    @property
    def title(self) -> str:
        return f"{self.adjective.capitalize()} {self.material} {self.noun.replace('_', ' ')}"

    @property
    def price(self) -> str:
        return f"${self.cents // 100}.{self.cents % 100:02d}"


@dataclass
class Request:
    noun: str
    adjective: str
    material: str | None
    color: str
    size: str
    budget: int  # cents

    def matches(self, p: Product) -> bool:
        return (p.noun == self.noun and p.adjective == self.adjective and self.material in (None, p.material)
                and p.cents <= self.budget and self.color in p.colors and self.size in p.sizes)


def build_catalogue(seed: int, split: str, test_share: float) -> list[Product]:
    rng = random.Random(seed)
    nouns, adjs, mats, colors = (pool(n, split, test_share) for n in ("noun", "adjective", "material", "color"))
    kinds = rng.sample(nouns, min(8, len(nouns)))
    out = []
    for i in range(N_PRODUCTS):
        out.append(Product(f"P{rng.randint(1000, 9999)}{i:02d}", rng.choice(kinds), rng.choice(adjs), rng.choice(mats),
                           rng.randint(5, 150) * 100 + rng.choice([0, 49, 99]),
                           sorted(rng.sample(colors, rng.randint(1, min(4, len(colors))))),
                           [s for s in SIZES if rng.random() < 0.6] or [rng.choice(SIZES)],
                           round(rng.uniform(2.5, 5.0), 1)))
    return out


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower().replace("_", " ")))


# ----------------------------------------------------------------------------- environment

class ShopEnv(Environment):
    def __init__(self, products: list[Product]):
        self.products = {p.id: p for p in products}
        self.orders: list[tuple[str, dict]] = []

    def _product(self, product_id: str) -> Product:
        p = self.products.get(product_id.strip())
        if p is None:
            raise ToolError(f"no product with id {product_id!r}")
        return p

    @tool
    def search(self, query: str) -> str:
        """Search the catalogue: products ranked by how many query words their title, colors and
        sizes contain (then by rating); ten results, one per line: id | title | price.

        Args:
            query: Keywords, e.g. 'waterproof wool jacket navy'.
        """
        q = words(query)
        if not q:
            raise ToolError("empty query")
        scored = []
        for p in self.products.values():
            text = words(p.title) | set(p.colors) | {s.lower() for s in p.sizes}
            score = len(q & text)
            if score:
                scored.append((-score, -p.rating, p.id))
        if not scored:
            return "(no results)"
        return "\n".join(f"{p.id} | {p.title} | {p.price}"
                         for p in (self.products[i] for _, _, i in sorted(scored)[:RESULTS]))

    @tool
    def view(self, product_id: str) -> str:
        """Show one product: title, price, rating and its options.

        Args:
            product_id: The id search shows, e.g. 'P482107'.
        """
        p = self._product(product_id)
        return (f"{p.id}: {p.title}\nprice: {p.price}\nrating: {p.rating}\n"
                f"color: {', '.join(p.colors)}\nsize: {', '.join(p.sizes)}")

    @tool
    def buy(self, product_id: str, color: str, size: str) -> str:
        """Order one product with the chosen options.

        Args:
            product_id: The product's id.
            color: One of the colors the product offers.
            size: One of the sizes the product offers.
        """
        p = self._product(product_id)
        if color not in p.colors:
            raise ToolError(f"color {color!r} is not available for {p.id} (choose from {', '.join(p.colors)})")
        if size not in p.sizes:
            raise ToolError(f"size {size!r} is not available for {p.id} (choose from {', '.join(p.sizes)})")
        self.orders.append((p.id, {"color": color, "size": size}))
        return f"Order placed: {p.title}, {color}, size {size}, {p.price}."


# ----------------------------------------------------------------------------- tasks

TEMPLATES = {
    "buy": ("I'm looking for a {adjective} {what} in {color}, size {size}, for at most {budget}.",
            "Please buy me a {adjective} {what}: color {color}, size {size}, no more than {budget}.",
            "Find a {adjective} {what} under {budget} and order it in {color}, size {size}.",
            "I need a {color} {adjective} {what} in size {size}; my budget is {budget}."),
}
NOTHING = re.compile(r"\b(no|none|nothing|not find|couldn't|could not|cannot)\b", re.I)


@dataclass
class Plan:
    request: Request
    query: str
    candidates: list[str] = field(default_factory=list)  # ids to view, in order
    choice: str | None = None


def _money(cents: int) -> str:
    return f"${cents // 100}" if cents % 100 == 0 else f"${cents // 100}.{cents % 100:02d}"


class ShopWorkflow(Workflow):
    name = "shop"
    instructions = """You are a shopping assistant. Find the product the customer asks for in the catalogue
(search, then view products to check their price and options) and buy it with the requested
color and size. Buy only a product that meets every requirement within the budget; if none
does, buy nothing and say that no product matches. After buying, reply with a short confirmation."""

    grammar = Phrasing({r"buy(?! me)": ("purchase", "order"), r"i'm looking for": ("i'm searching for", "i want"),
                        r"color": ("colour",), r"at most": ("no more than", "up to"), r"no more than": ("at most",),
                        r"under": ("below", "for less than"), r"budget": ("limit",)})

    def __init__(self, test_share: float = 0.3, heldout_template_share: float = 0.25, mistake_rate: float = 0.0,
                 fault_rate: float = 0.0, none_share: float = 0.15, phrasing: str = "rich"):
        """none_share: the share of requests that nothing in the catalogue satisfies."""
        super().__init__(test_share, heldout_template_share, mistake_rate, fault_rate, phrasing)
        if not 0 <= none_share < 1:
            raise ValueError("none_share must be in [0, 1)")
        self.none_share = none_share

    def _build(self, split: str, index: int, seed: int) -> tuple[Task, Plan]:
        products = build_catalogue(seed, split, self.test_share)
        rng = random.Random(seed ^ 0x5709)
        want_none = rng.random() < self.none_share
        for _ in range(200):
            p = rng.choice(products)
            req = Request(p.noun, p.adjective, p.material if rng.random() < 0.5 else None, rng.choice(p.colors),
                          rng.choice(p.sizes), p.cents + rng.choice([0, 1, 5, 20]) * 100)
            if want_none:  # the same request made impossible: a color or a budget nobody meets
                if rng.random() < 0.5:
                    req.budget = p.cents - rng.randint(1, 20) * 100
                else:
                    req.color = rng.choice([c for c in pool("color", split, self.test_share) if c not in p.colors]
                                           or [req.color])
            matching = [q.id for q in products if req.matches(q)]
            if bool(matching) != want_none and req.budget > 0:
                break
        else:
            raise RuntimeError(f"no request could be drawn for seed {seed}")
        what = f"{req.material} {req.noun}" if req.material else req.noun
        params = {"adjective": req.adjective, "what": what.replace("_", " "), "color": req.color,
                  "size": req.size, "budget": _money(req.budget)}
        gold = {"kind": "purchase", "matching": matching, "color": req.color, "size": req.size}
        task = self.make_task(rng, split, index, seed, "none" if want_none else "buy", TEMPLATES["buy"], params,
                              gold, "shop-buy")
        query = " ".join([req.adjective] + ([req.material] if req.material else []) + [req.noun.replace("_", " ")])
        return task, Plan(req, query)

    def sample_task(self, split: str, index: int, seed: int) -> Task:
        return self._build(split, index, seed)[0]

    def make_env(self, task: Task) -> ShopEnv:
        return ShopEnv(build_catalogue(task.seed, task.split, self.test_share))

    def teacher(self, task: Task, env: ShopEnv):
        plan = self._build(task.split, task.index, task.seed)[1]
        req = plan.request
        rng = random.Random(task.seed ^ 0x7EAC)
        obs = yield Call("search", {"query": plan.query}, rng.choice((
            f"Searching for {plan.query}.", f"Let me search the catalogue for {plan.query}.")))
        rows = [line.split(" | ") for line in obs.text.splitlines() if " | " in line]
        titles = {pid: title for pid, title, _ in rows}
        # candidates: the right kind of product (every query word in the title) within the budget
        fits = [pid for pid, title, price in rows
                if words(title) >= words(plan.query) and round(float(price.lstrip("$")) * 100) <= req.budget]
        for n, pid in enumerate(fits):
            obs = yield Call("view", {"product_id": pid}, rng.choice((
                f"{pid} is the right kind and within budget; checking its options.", f"Let me look at {pid}.")) if not n
                else rng.choice((f"Next candidate within budget: {pid}.", f"Then {pid}.")))
            info = dict(line.split(": ", 1) for line in obs.text.splitlines()[1:])
            price = int(round(float(info["price"].lstrip("$")) * 100))
            if price <= req.budget and req.color in info["color"].split(", ") and req.size in info["size"].split(", "):
                yield Call("buy", {"product_id": pid, "color": req.color, "size": req.size},
                           f"{pid} costs {info['price']} and comes in {req.color}, size {req.size}: buying it.")
                yield Answer(f"I bought the {titles[pid]} ({req.color}, size {req.size}) for {info['price']}.",
                             "The order went through.")
                return
        yield Answer("No product matches: nothing in the catalogue meets all of the requirements within the budget.",
                     "None of the candidates has everything asked for within the budget." if fits else
                     "The search shows no product of that kind within the budget.")

    def mistake(self, task: Task, env: ShopEnv, call: Call, rng: random.Random) -> Mistake | None:
        """Buying in a size the product does not offer."""
        if call.tool != "buy":
            return None
        p = env.products[call.args["product_id"]]
        wrong = [s for s in SIZES if s not in p.sizes]
        if not wrong:
            return None
        w = rng.choice(wrong)
        return Mistake(Call("buy", call.args | {"size": w}, call.reasoning),
                       f"{p.id} has no size {w}; the customer asked for {call.args['size']}, which it offers.")

    def lookaround(self, call: Call) -> str | None:
        """search and view only look; buy decides."""
        if call.tool == "search":
            return "search:" + " ".join(str(call.args.get("query", "")).lower().split())
        if call.tool == "view":
            return "view:" + str(call.args.get("product_id", "")).strip()
        return None

    def state_key(self, env: ShopEnv) -> str:
        """The orders placed: a purchase cannot be undone."""
        return repr(env.orders)

    def check(self, task: Task, env: ShopEnv, answer: str) -> Verdict:
        gold = task.gold
        if not gold["matching"]:
            if env.orders:
                return Verdict(False, f"bought {env.orders[0][0]} although nothing matches")
            ok = bool(NOTHING.search(answer))
            return Verdict(ok, "" if ok else f"nothing matches, but the answer does not say so: {answer!r}")
        if len(env.orders) != 1:
            return Verdict(False, f"{len(env.orders)} orders placed; expected exactly one")
        pid, options = env.orders[0]
        if pid not in gold["matching"]:
            return Verdict(False, f"bought {pid}, which does not meet the request")
        ok = options == {"color": gold["color"], "size": gold["size"]}
        return Verdict(ok, "" if ok else f"bought {pid} with options {options}")


WORKFLOW = ShopWorkflow
