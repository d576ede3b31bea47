"""The world of the SQL workflow: one shop's SQLite database, generated from a seed.

About a thousand rows of customers, products, orders and order lines, sometimes with a categories
table and distractor tables (suppliers, reviews), and table and column names that change from shop
to shop (customers may be `clients`, price may be `list_price`, dates may be `placed_on`), so an
agent has to explore the schema before it can query it. Entity pools (names, cities, categories,
products) are split between train and test with base.split_pool: a test shop holds values no train
shop has.

The rows are plain Python tuples (`Shop.tables`), from which workflows/sql.py computes gold answers
without SQL; `Schema.project` turns them into the rows the database holds.
"""
from __future__ import annotations

import bisect
import datetime as dt
import functools
import hashlib
import itertools
import random
import re
from collections import Counter, namedtuple
from operator import attrgetter
from typing import Callable

from agentc.workflows.base import split_pool, stable_hash

# ----------------------------------------------------------------------------- pools
# Entity values and question numbers. Each pool is split between train and test with split_pool,
# so a test database holds names, cities, categories and products that no train database has.
# No commas (list answers are comma-separated) and no quotes (values go into SQL literals).

FIRST_NAMES = """Ada Alan Alice Amara Anton Aria Basil Beatrix Bruno Camille Carlos Cecilia Dara
Dmitri Elena Elias Emeka Esther Farah Felix Fiona Gideon Greta Hana Hector Ines Ingrid Ivan Jasper
Jonas Julia Kai Kamala Keiko Lars Leila Lionel Lucia Magnus Maya Milo Nadia Nico Nora Olga Omar Oscar
Paloma Pavel Priya Quentin Rafael Rosa Ruth Samir Selma Soren Tariq Tessa Theo Ulla Vera Victor Wanda
Wes Xenia Yara Yusuf Zara Zeno""".split()
LAST_NAMES = """Abbott Achebe Alvarez Baker Barros Bianchi Brennan Castillo Chen Costa Dalton Dubois
Eriksen Ferrari Fischer Garner Gupta Haddad Hartley Holm Ibarra Ivanova Jansen Kaur Keller Kowalski
Laurent Lindqvist Lopez Madsen Mancini Moreau Murphy Nakamura Novak Nyberg Okafor Olsen Ortiz Park
Patel Quinn Ramos Reyes Rossi Sato Schmidt Silva Sorensen Stone Suzuki Tanaka Torres Ueda Varga Vega
Wagner Walsh Weber Xu Yamamoto Young Zeller Zhang Ziegler Amari Brandt Coleman Dimitrov""".split()
CITIES = """Lyon Porto Dresden Bergen Malaga Gdansk Leeds Utrecht Graz Turin Aarhus Bilbao Krakow Nantes
Tampere Brno Cork Ghent Bologna Tartu Split Salzburg Uppsala Lille Seville Riga Basel Bristol Szeged
Verona Kaunas Toulouse Linz Galway Plovdiv Ljubljana Coimbra Bordeaux Trondheim Innsbruck""".split()
CATEGORIES = {  # category -> product nouns (unique across categories, so products split with them)
    "Kitchen": ["Kettle", "Toaster", "Skillet", "Colander", "Whisk", "Saucepan", "Teapot", "Grater"],
    "Lighting": ["Lamp", "Lantern", "Sconce", "Chandelier", "Nightlight", "Bulb"],
    "Garden": ["Trowel", "Planter", "Hose", "Rake", "Shears", "Birdbath", "Wheelbarrow"],
    "Office": ["Stapler", "Binder", "Organizer", "Whiteboard", "Shredder", "Calculator"],
    "Furniture": ["Armchair", "Bookshelf", "Sofa", "Stool", "Dresser", "Wardrobe", "Bench"],
    "Bedding": ["Pillow", "Duvet", "Quilt", "Blanket", "Mattress", "Sheet"],
    "Audio": ["Headphones", "Speaker", "Turntable", "Microphone", "Amplifier", "Soundbar"],
    "Toys": ["Puzzle", "Kite", "Robot", "Teddy", "Marbles", "Spinning Top"],
    "Sports": ["Racket", "Dumbbell", "Kettlebell", "Yoga Mat", "Football", "Stopwatch"],
    "Camping": ["Tent", "Hammock", "Compass", "Canteen", "Tarp", "Headlamp", "Cooler"],
    "Bath": ["Towel", "Bathrobe", "Loofah", "Soap Dish", "Shower Caddy", "Bath Mat"],
    "Pets": ["Leash", "Collar", "Birdcage", "Aquarium", "Scratcher", "Kennel"],
    "Stationery": ["Pen", "Pencil", "Eraser", "Envelope", "Journal", "Marker"],
    "Baking": ["Spatula", "Sieve", "Ramekin", "Muffin Tin", "Rolling Pin", "Cake Stand"],
    "Cycling": ["Helmet", "Pump", "Saddle", "Bell", "Pannier", "Bike Lock"],
    "Tools": ["Hammer", "Wrench", "Screwdriver", "Pliers", "Chisel", "Toolbox"],
    "Electronics": ["Charger", "Adapter", "Router", "Webcam", "Keyboard", "Mouse"],
    "Clothing": ["Scarf", "Jacket", "Sweater", "Beanie", "Raincoat", "Cardigan"],
    "Footwear": ["Sneaker", "Boot", "Sandal", "Slipper", "Loafer", "Clog"],
    "Jewelry": ["Necklace", "Bracelet", "Ring", "Brooch", "Earring", "Pendant"],
    "Art Supplies": ["Easel", "Canvas", "Palette", "Paintbrush", "Sketchbook", "Charcoal"],
    "Gaming": ["Controller", "Joystick", "Headset", "Gamepad", "Racing Wheel", "Console Stand"],
    "Tableware": ["Plate", "Bowl", "Mug", "Goblet", "Platter", "Saucer"],
    "Decor": ["Vase", "Candle", "Rug", "Cushion", "Picture Frame", "Wall Clock"],
    "Travel": ["Suitcase", "Backpack", "Duffel", "Toiletry Bag", "Passport Cover", "Travel Plug"],
    "Music": ["Guitar", "Ukulele", "Harmonica", "Violin", "Metronome", "Tambourine"],
    "Cleaning": ["Mop", "Broom", "Bucket", "Sponge", "Duster", "Squeegee"],
}
ADJECTIVES = """Red Blue Green Amber Ivory Slate Coral Teal Olive Crimson Indigo Copper Silver Golden
Walnut Oak Bamboo Marble Linen Velvet Cedar Maple Cobalt Sage Ruby Onyx Pearl Mint Rustic Classic
Compact Deluxe Vintage Nordic Urban Alpine Coastal Royal Misty Arctic""".split()
SUPPLIER_SUFFIXES = ["Trading", "Supply", "Wholesale", "Imports", "Goods"]
STATUSES = ["pending", "shipped", "delivered", "cancelled"]
YEARS = list(range(2020, 2025))                        # orders span 2020-01-01 .. 2024-12-31
MONTHS = [f"{y}-{m:02d}" for y in YEARS for m in range(1, 13)]
MONTH_NAMES = ["January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December"]
POOLS = {"first": FIRST_NAMES, "last": LAST_NAMES, "city": CITIES, "category": list(CATEGORIES),
         "adjective": ADJECTIVES, "year": YEARS, "month": MONTHS,
         "more_than": list(range(2, 10)), "percent": list(range(3, 31)), "stock": list(range(5, 51))}


@functools.lru_cache(maxsize=None)
def entity_pool(name: str, split: str, test_share: float) -> tuple:
    return tuple(split_pool(POOLS[name], split, test_share, salt=f"sql-{name}"))


# Invented names (train split only, `invented` > 0). A pool of ~70 first names is small enough for a
# model to memorise every name's spelling, and then it never learns to copy a name it has not seen,
# which is all the test split asks of it. Mixing pronounceable made-up words into the train pools
# (a fresh set per shop) makes copying the only way to predict them.
ONSETS = "b br c ch d dr f fl g gr h j k kr l m n p pl r s sh st t tr v w y z".split() + [""] * 4
NUCLEI = "a e i o u a e i o u ai ea ia io ou".split()
CODAS = [""] * 14 + "l m n r s t k nd rt ll ss".split()
SYLLABLES = tuple(o + n + c for o in ONSETS for n in NUCLEI for c in CODAS)  # repeats weight the common ones
ENTITY_POOLS = ("first", "last", "city", "category", "adjective")
TAKEN = {str(v).casefold() for values in POOLS.values() for v in values} | \
        {n.casefold() for nouns in CATEGORIES.values() for n in nouns}


def invent_words(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """n distinct made-up words, none equal (ignoring case) to a real pool value or to `taken`."""
    out = []
    while len(out) < n:
        w = "".join(rng.choices(SYLLABLES, k=rng.randint(*syllables))).capitalize()
        if len(w) >= 3 and w.casefold() not in TAKEN and w.casefold() not in taken:
            taken.add(w.casefold())
            out.append(w)
    return out


def shop_pools(rng: random.Random, split: str, test_share: float, invented: float) -> tuple[dict, Callable]:
    """The entity pools one shop draws from: the split's real values, plus (train split,
    0 < invented < 1) made-up ones, about `invented` of each pool; and nouns(category), the product
    nouns of a category (made up for a made-up category, on first use)."""
    pools = {name: entity_pool(name, split, test_share) for name in ENTITY_POOLS}
    if split != "train" or invented <= 0:
        return pools, CATEGORIES.__getitem__
    taken: set[str] = set()
    extra = lambda n: max(1, round(n * invented / (1 - invented)))  # noqa: E731
    pools = {name: values + tuple(invent_words(rng, extra(len(values)), taken)) for name, values in pools.items()}
    made_up: dict[str, list[str]] = {}

    def nouns(category: str) -> list[str]:
        if category in CATEGORIES:
            return CATEGORIES[category]
        return made_up.setdefault(category, invent_words(rng, 6, taken, (1, 2)))
    return pools, nouns


# ----------------------------------------------------------------------------- schema
# Logical names (used by the code) -> the names one shop may use. The singular names the key columns.

TABLE_NAMES = {
    "customers": [("customers", "customer"), ("clients", "client"), ("buyers", "buyer")],
    "categories": [("categories", "category"), ("product_categories", "category")],
    "suppliers": [("suppliers", "supplier"), ("vendors", "vendor")],
    "products": [("products", "product"), ("articles", "article"), ("catalog_items", "item")],
    "orders": [("orders", "order"), ("purchases", "purchase"), ("sales", "sale")],
    "order_items": [("order_items", "order_item"), ("order_lines", "line"), ("line_items", "line_item")],
    "reviews": [("reviews", "review"), ("product_reviews", "review")],
}
COLUMN_NAMES = {
    ("customers", "first"): ["first_name", "given_name"],
    ("customers", "last"): ["last_name", "surname", "family_name"],
    ("customers", "full"): ["full_name", "name"],
    ("customers", "city"): ["city", "town", "home_city"],
    ("customers", "signup"): ["signup_date", "joined_on", "created_at"],
    ("customers", "email"): ["email", "email_address"],
    ("categories", "name"): ["name", "category_name", "label"],
    ("suppliers", "name"): ["name", "company"],
    ("suppliers", "city"): ["city", "based_in"],
    ("products", "name"): ["name", "product_name", "title"],
    ("products", "category"): ["category", "category_name"],
    ("products", "price"): ["price", "unit_price", "list_price"],
    ("products", "stock"): ["stock", "stock_qty", "units_in_stock"],
    ("orders", "date"): ["order_date", "placed_on", "ordered_at"],
    ("orders", "status"): ["status", "state", "order_status"],
    ("order_items", "qty"): ["quantity", "qty", "units"],
    ("order_items", "price"): ["unit_price", "price_paid", "sale_price"],
    ("reviews", "rating"): ["rating", "stars"],
    ("reviews", "date"): ["review_date", "posted_on"],
}
TYPES = {"price": "REAL", "stock": "INTEGER", "qty": "INTEGER", "rating": "INTEGER"}


class Schema:
    """The physical names of one shop's database. `cols[table]` lists (field, column, declaration)
    where `field` is the attribute of the Python row the column is read from."""

    def __init__(self, rng: random.Random):
        self.t, singular = {}, {}
        for logical, options in TABLE_NAMES.items():
            self.t[logical], singular[logical] = rng.choice(options)
        self.split_names = rng.random() < 0.5          # first/last name columns, or one full name
        self.category_table = rng.random() < 0.5       # categories normalised into their own table
        optional = {"suppliers": rng.random() < 0.5, "reviews": rng.random() < 0.5,
                    "categories": self.category_table, "email": rng.random() < 0.5}
        long_keys = rng.random() < 0.5                 # primary keys named `id` or `<singular>_id`
        pk = {t: f"{singular[t]}_id" if long_keys else "id" for t in TABLE_NAMES}

        def col(table, field):
            return field, rng.choice(COLUMN_NAMES[table, field]), TYPES.get(field, "TEXT")

        def fk(target, field):
            return field, f"{singular[target]}_id", f"INTEGER REFERENCES {self.t[target]}({pk[target]})"

        spec = {
            "customers": ([col("customers", "first"), col("customers", "last")] if self.split_names
                          else [col("customers", "full")])
            + [col("customers", "city"), col("customers", "signup")]
            + ([col("customers", "email")] if optional["email"] else []),
            "categories": [col("categories", "name")],
            "suppliers": [col("suppliers", "name"), col("suppliers", "city")],
            "products": [col("products", "name"),
                         fk("categories", "category_id") if self.category_table else col("products", "category"),
                         col("products", "price"), col("products", "stock")]
            + ([fk("suppliers", "supplier")] if optional["suppliers"] else []),
            "orders": [fk("customers", "customer"), col("orders", "date"), col("orders", "status")],
            "order_items": [fk("orders", "order"), fk("products", "product"), col("order_items", "qty"),
                            col("order_items", "price")],
            "reviews": [fk("products", "product"), fk("customers", "customer"), col("reviews", "rating"),
                        col("reviews", "date")],
        }
        self.cols = {t: [("id", pk[t], "INTEGER PRIMARY KEY")] + c for t, c in spec.items()
                     if optional.get(t, True)}
        self.col = {(t, f): name for t, cs in self.cols.items() for f, name, _ in cs}

    def name_expr(self, alias: str) -> str:
        """SQL for a customer's full name."""
        if self.split_names:
            return f"{alias}.{self.col['customers', 'first']} || ' ' || {alias}.{self.col['customers', 'last']}"
        return f"{alias}.{self.col['customers', 'full']}"

    def name_filter(self, first: str, last: str) -> str:
        if self.split_names:
            return f"{self.col['customers', 'first']} = '{first}' AND {self.col['customers', 'last']} = '{last}'"
        return f"{self.col['customers', 'full']} = '{first} {last}'"

    def fmt(self, text: str, **kw) -> str:
        """Fill {table}, {table.field} and {keyword} placeholders; unknown ones ({cid}...) are kept
        for values the teacher only learns at run time. Products are aliased p, categories k."""
        kw = {"cname": self.name_expr("c"),
              "cat": (f"k.{self.col['categories', 'name']}" if self.category_table
                      else f"p.{self.col['products', 'category']}"),
              "cat_join": (f" JOIN {self.t['categories']} k ON k.{self.col['categories', 'id']} = "
                           f"p.{self.col['products', 'category_id']}" if self.category_table else "")} | kw

        def sub(m):
            if m.group(2):
                return self.col[m.group(1), m.group(2)]
            return str(kw[m.group(1)]) if m.group(1) in kw else self.t.get(m.group(1), m.group(0))
        return re.sub(r"\{(\w+)(?:\.(\w+))?\}", sub, text)

    def project(self, tables: dict[str, list]) -> dict[str, list[tuple]]:
        """Python rows -> {physical table: rows as the database holds them}."""
        out = {}
        for t, cs in self.cols.items():
            get = attrgetter(*(f for f, _, _ in cs))
            out[self.t[t]] = [get(r) for r in tables[t]]
        return out


# ----------------------------------------------------------------------------- database content

# Python rows. Gold answers use the integer `cents`; `price` (cents / 100) is what the database holds.
# Order lines store the price paid, equal to the product's price when the shop was generated.
Customer = namedtuple("Customer", "id first last full city signup email")
Category = namedtuple("Category", "id name")
Supplier = namedtuple("Supplier", "id name city")
Product = namedtuple("Product", "id name category category_id cents price stock supplier")
Order = namedtuple("Order", "id customer date status")
Item = namedtuple("Item", "id order product qty cents price")
Review = namedtuple("Review", "id product customer rating date")

FIRST_DAY, LAST_DAY = dt.date(2020, 1, 1).toordinal(), dt.date(2024, 12, 31).toordinal()


def iso(ordinal: int) -> str:
    return dt.date.fromordinal(ordinal).isoformat()


def long_date(date: str) -> str:
    y, m, d = map(int, date.split("-"))
    return f"{d} {MONTH_NAMES[m - 1]} {y}"


class Shop:
    """One shop's rows (logical table -> list of row tuples) and the indexes the gold answers use."""

    def __init__(self, schema: Schema, tables: dict[str, list], pools: dict[str, tuple]):
        self.schema, self.tables, self.pools = schema, tables, pools  # pools: the values its questions draw from
        self.customers, self.products, self.orders = tables["customers"], tables["products"], tables["orders"]
        self.categories = [c.name for c in tables["categories"]]
        self.product = {p.id: p for p in self.products}
        # Plain dicts filled up front: a shop is shared through build_shop's cache and must not change.
        self.lines = {o.id: [] for o in self.orders}
        self.orders_of = {c.id: [] for c in self.customers}
        for i in tables["order_items"]:
            self.lines[i.order].append(i)
        for o in self.orders:
            self.orders_of[o.customer].append(o)
        self.spend = Counter()  # customer id -> cents over non-cancelled orders
        for o in self.orders:
            if o.status != "cancelled":
                self.spend[o.customer] += self.order_cents(o)

    def order_cents(self, o: Order) -> int:
        return sum(i.qty * i.cents for i in self.lines[o.id])


def _sampler(rng: random.Random, values: list, weights) -> Callable[[], object]:
    """Draw from `values` with `weights` (cheaper than rng.choices for thousands of draws)."""
    cum = list(itertools.accumulate(weights))
    return lambda: values[bisect.bisect(cum, rng.random() * cum[-1])]


@functools.lru_cache(maxsize=16)  # sample_task and make_env both need the shop of a task
def build_shop(seed: int, split: str, test_share: float, invented: float = 0.0) -> Shop:
    rng = random.Random(stable_hash("sql-shop", seed))
    schema = Schema(rng)
    pools, nouns_of = shop_pools(random.Random(stable_hash("sql-invented", seed)), split, test_share, invented)
    pool = pools.__getitem__

    # Sizes are capped by the pools, which shrink on one side when --test-share is far from 0.3.
    sample = lambda values, lo, hi: rng.sample(values, min(len(values), rng.randint(lo, hi)))  # noqa: E731
    cities, names, customers = sample(pool("city"), 8, 12), set(), []
    n_customers = min(rng.randint(70, 110), len(pool("first")) * len(pool("last")) // 2)
    signed_up = {}  # customer id -> ordinal of the signup day
    while len(customers) < n_customers:
        first, last = rng.choice(pool("first")), rng.choice(pool("last"))
        if (first, last) not in names:
            names.add((first, last))
            cid = len(customers) + 1
            signed_up[cid] = rng.randint(dt.date(2018, 1, 1).toordinal(), dt.date(2024, 6, 30).toordinal())
            customers.append(Customer(cid, first, last, f"{first} {last}", rng.choice(cities), iso(signed_up[cid]),
                                      f"{first}.{last}@example.com".lower()))

    categories = [Category(i + 1, c) for i, c in enumerate(sample(pool("category"), 5, 7))]
    suppliers = [Supplier(i + 1, f"{name} {rng.choice(SUPPLIER_SUFFIXES)}", rng.choice(cities))
                 for i, name in enumerate(sample(pool("last"), 4, 8))]
    adjectives, drafts = pool("adjective"), []
    for cat in categories:
        nouns = nouns_of(cat.name)
        for k in sample(range(len(adjectives) * len(nouns)), 5, 10):
            drafts.append((f"{adjectives[k // len(nouns)]} {nouns[k % len(nouns)]}", cat))
    rng.shuffle(drafts)
    products = []
    for i, (name, cat) in enumerate(drafts):
        cents = rng.randint(3, 250) * 100 - rng.choice((1, 1, 1, 5, 50, 0))
        stock = rng.randint(0, 25) if rng.random() < 0.35 else rng.randint(26, 240)
        products.append(Product(i + 1, name, cat.name, cat.id, cents, cents / 100, stock,
                                rng.randint(1, len(suppliers))))

    # ~12% of customers never order; the others order after signing up, with heavy-tailed frequencies
    # (as do products), so some stand out and arg-max questions have clear winners.
    active = [c for c in customers if rng.random() > 0.12]
    pick_customer = _sampler(rng, active, [rng.paretovariate(1.5) for _ in active])
    pick_product = _sampler(rng, products, [rng.paretovariate(1.2) for _ in products])
    n_lines, qty = _sampler(rng, (1, 2, 3, 4), (40, 30, 20, 10)), _sampler(rng, (1, 2, 3, 4, 5), (50, 25, 12, 8, 5))
    drafts = []
    for _ in range(rng.randint(220, 320)):
        c = pick_customer()
        day = rng.randint(max(FIRST_DAY, signed_up[c.id]), LAST_DAY)
        r = rng.random()
        if day > LAST_DAY - 20:  # recent orders are not delivered yet
            status = "pending" if r < 0.6 else "shipped"
        else:
            status = "delivered" if r < 0.7 else "cancelled" if r < 0.83 else "pending" if r < 0.93 else "shipped"
        drafts.append((day, c.id, status))
    drafts.sort()
    orders = [Order(i + 1, cid, iso(day), status) for i, (day, cid, status) in enumerate(drafts)]
    items = []
    for o in orders:
        for p in dict.fromkeys(pick_product() for _ in range(n_lines())):  # distinct products per order
            items.append(Item(len(items) + 1, o.id, p.id, qty(), p.cents, p.price))
    stars = _sampler(rng, (1, 2, 3, 4, 5), (5, 7, 15, 35, 38))
    reviews = [Review(i + 1, pick_product().id, rng.choice(customers).id, stars(),
                      iso(rng.randint(FIRST_DAY, LAST_DAY))) for i in range(rng.randint(80, 160))]
    return Shop(schema, {"customers": customers, "categories": categories, "suppliers": suppliers,
                         "products": products, "orders": orders, "order_items": items, "reviews": reviews}, pools)


def state_hash(tables: dict[str, list[tuple]]) -> str:
    """Order-independent hash of whole tables; floats at 2 decimals (money is kept to the cent)."""
    h = hashlib.sha256()
    for name in sorted(tables):
        rows = sorted("\x1f".join("NULL" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
                                  for v in row) for row in tables[name])
        h.update(f"{name}\x1e{len(rows)}\x1e".encode() + "\x1d".join(rows).encode() + b"\x1c")
    return h.hexdigest()
