"""Support workflow: a τ-bench-style service desk with a written policy and a scripted user.

Every task gets its own store database (six customers, each with one to three orders of one to
three items). The user opens with a request about one item ("I want to return the desk lamp I
ordered") but gives details only when asked, through the ask_user tool: the email address on the
account, the new color or size for an exchange, and a yes or no when asked to confirm. The agent
looks the customer and the order up and then follows the policy in its instructions: cancel only
orders still processing, return or exchange delivered items only within 30 days of delivery, and
confirm before changing anything. Tools enforce what is physically impossible (returning an item
that never arrived), not the policy: a policy breach goes through and fails the task.

Families: status (where is my order), cancel, cancel_refused (already shipped or delivered),
return, exchange, late (a return or exchange past 30 days: refuse) and declined (the user says no
at the confirmation: change nothing). Success = the final database equals the gold database (one
digest over every order's status and every item's state and option) and the answer tells the user
the required facts (the refund, the new option, the tracking number, the reason for a refusal).

Splits: first names, last names, products and colors come from split pools. The deliberate
mistakes are a mistyped email address and an item id that is not in the order; both tools refuse
before anything changes.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass

from agentc.workflows.base import (Answer, Call, Environment, Mistake, Task, ToolError, Verdict, Workflow, draw_family,
                                   resample, split_pool, tool)
from agentc.workflows.phrasing import Phrasing

FIRST = """Ada Aiko Amir Ana Arlo Bea Bruno Caio Cleo Dara Dev Edda Eli Emre Enzo Esme Faye Finn Gael Gia
Hana Ines Ivo Jana Joel Kai Kira Lars Lea Leon Lina Luca Maja Malik Mara Milo Nadia Nils Noor Omar Otto
Pia Raj Rosa Sami Sara Tariq Teo Uma Vera Yara Yusuf Zoe""".split()
LAST = """Abbott Acosta Bauer Becker Brandt Castro Chen Costa Dahl Diaz Eriksen Ferreira Fischer Garcia Haas
Hansen Ito Jensen Kato Keller Kowalski Larsen Lopez Meyer Moreau Nakamura Novak Okafor Ortiz Patel Perez
Quinn Rossi Sato Schmidt Silva Sousa Tanaka Torres Vogel Wagner Weber Yilmaz Zhang""".split()
DOMAINS = ("mail.com", "inbox.net", "post.org", "webmail.io")
# product -> the option it comes in; colors come from a split pool, sizes are fixed per kind
PRODUCTS = {
    "desk lamp": "color", "water bottle": "color", "backpack": "color", "yoga mat": "color", "kettle": "color",
    "phone case": "color", "umbrella": "color", "coffee mug": "color", "notebook": "color", "bike helmet": "size",
    "hiking boots": "size", "running shoes": "size", "rain jacket": "size", "wool sweater": "size",
    "sandals": "size", "gloves": "size", "sun hat": "size", "denim jeans": "size", "winter coat": "size",
    "office chair": "color", "blender": "color", "headphones": "color", "wall clock": "color",
}
COLORS = "red blue green black white grey navy olive beige pink purple orange teal brown yellow".split()
SIZES = ("XS", "S", "M", "L", "XL")
WINDOW = 30  # days after delivery in which returns and exchanges are accepted
STATUSES = ("processing", "shipped", "delivered", "cancelled")


@functools.lru_cache(maxsize=None)
def pool(name: str, split: str, test_share: float) -> tuple:
    values = {"first": FIRST, "last": LAST, "product": list(PRODUCTS), "color": COLORS}[name]
    return tuple(split_pool(values, split, test_share, salt=f"support-{name}"))


@dataclass
class Item:
    id: str
    product: str
    value: str          # the chosen color or size
    cents: int
    state: str = "ordered"  # ordered | returned | exchanged

    @property
    def option(self) -> str:
        return PRODUCTS[self.product]


@dataclass
class Order:
    id: str
    status: str         # one of STATUSES
    days: int           # days since delivery (delivered orders only)
    tracking: str       # shipped orders only
    items: list[Item]

    @property
    def cents(self) -> int:
        return sum(i.cents for i in self.items)


@dataclass
class Customer:
    id: str
    name: str
    email: str
    orders: list[Order]


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def build_db(seed: int, split: str, test_share: float) -> list[Customer]:
    rng = random.Random(seed)
    firsts, lasts, products, colors = (pool(n, split, test_share) for n in ("first", "last", "product", "color"))
    customers, ids = [], set()

    def fresh(prefix: str, digits: int) -> str:
        while True:
            out = f"{prefix}{rng.randrange(10 ** (digits - 1), 10 ** digits)}"
            if out not in ids:
                ids.add(out)
                return out

    for _ in range(6):
        while True:  # one account per email address
            first, last = rng.choice(firsts), rng.choice(lasts)
            email = f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}".lower()
            if email not in ids:
                ids.add(email)
                break
        orders = []
        for _ in range(rng.randint(1, 3)):
            status = rng.choices(STATUSES, (3, 3, 5, 1))[0]
            items = []
            for product in rng.sample(products, rng.randint(1, 3)):
                value = rng.choice(colors if PRODUCTS[product] == "color" else SIZES)
                items.append(Item(fresh("I", 5), product, value, rng.randint(8, 250) * 100 + rng.choice((0, 49, 99))))
            orders.append(Order(fresh("W", 6), status, rng.randint(1, 90) if status == "delivered" else 0,
                                f"1Z{rng.randrange(16 ** 8):08X}" if status == "shipped" else "", items))
        customers.append(Customer(fresh("C", 5), f"{first} {last}", email, orders))
    return customers


def digest(customers: list[Customer]) -> str:
    """One hash over what an agent can change: every order's status and every item's state and option."""
    parts = [f"{o.id}:{o.status}:" + ",".join(f"{i.id}={i.state}/{i.value}" for i in o.items)
             for c in customers for o in c.orders]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the scripted user

@dataclass
class User:
    """What the customer knows and will say when asked (never volunteered)."""
    email: str
    goal: str           # their request, repeated when a question makes no sense to them
    new_value: str      # the color or size they want instead (exchanges), else ""
    confirms: bool      # their answer when asked to confirm a change

    def reply(self, question: str) -> str:
        q = question.lower()
        if re.search(r"\b(confirm|go ahead|proceed|shall i|should i)\b", q):
            return "Yes, please go ahead." if self.confirms else "No, please leave it as it is."
        if "email" in q:
            return f"It's {self.email}."
        if re.search(r"\b(color|colour|size)\b", q) or "instead" in q:
            return f"{self.new_value}, please." if self.new_value else "I don't want a different one."
        if "order" in q and re.search(r"\b(number|id)\b", q):
            return "I don't have the order number at hand, sorry."
        return f"Sorry, I'm not sure what you mean. {self.goal}"


# ----------------------------------------------------------------------------- environment

class SupportEnv(Environment):
    def __init__(self, customers: list[Customer], user: User):
        self.customers = customers
        self.user = user
        self.orders = {o.id: o for c in customers for o in c.orders}
        self.questions: list[str] = []

    def _order(self, order_id: str) -> Order:
        o = self.orders.get(order_id.strip().lstrip("#"))
        if o is None:
            raise ToolError(f"no order with id {order_id!r}")
        return o

    def _item(self, order: Order, item_id: str) -> Item:
        for i in order.items:
            if i.id == item_id.strip():
                return i
        raise ToolError(f"order {order.id} has no item {item_id!r} (its items: {', '.join(i.id for i in order.items)})")

    @tool
    def ask_user(self, question: str) -> str:
        """Ask the customer a question and get their reply.

        Args:
            question: The question, e.g. 'Could you tell me the email address on your account?'.
        """
        if not question.strip():
            raise ToolError("empty question")
        self.questions.append(question)
        return self.user.reply(question)

    @tool
    def find_customer(self, email: str) -> str:
        """Look a customer up by email address: their id and name, and their orders, one per line:
        order id | status | products.

        Args:
            email: The email address on the account.
        """
        for c in self.customers:
            if c.email == email.strip().lower():
                lines = [f"{o.id} | {o.status} | {', '.join(i.product for i in o.items)}" for o in c.orders]
                return f"customer {c.id}: {c.name} <{c.email}>\norders:\n" + "\n".join(lines)
        raise ToolError(f"no customer with email {email!r}")

    @tool
    def get_order(self, order_id: str) -> str:
        """Show one order: its status (with the days since delivery, or the tracking number), its
        items, one per line: item id | product | option | price | state, and the total.

        Args:
            order_id: The order id, e.g. 'W482107'.
        """
        o = self._order(order_id)
        status = {"delivered": f"delivered {o.days} days ago", "shipped": f"shipped, tracking {o.tracking}"}
        lines = [f"{i.id} | {i.product} | {i.option} {i.value} | {money(i.cents)} | {i.state}" for i in o.items]
        return (f"order {o.id}\nstatus: {status.get(o.status, o.status)}\nitems:\n" + "\n".join(lines)
                + f"\ntotal: {money(o.cents)}")

    @tool
    def cancel_order(self, order_id: str) -> str:
        """Cancel an order that has not been delivered and refund its total.

        Args:
            order_id: The order id.
        """
        o = self._order(order_id)
        if o.status in ("delivered", "cancelled"):
            raise ToolError(f"order {o.id} is {o.status} and cannot be cancelled")
        o.status = "cancelled"
        return f"Order {o.id} cancelled; {money(o.cents)} refunded to the original payment method."

    @tool
    def return_item(self, order_id: str, item_id: str) -> str:
        """Return one delivered item and refund its price.

        Args:
            order_id: The order id.
            item_id: The item's id, as get_order shows it.
        """
        o = self._order(order_id)
        i = self._item(o, item_id)
        if o.status != "delivered":
            raise ToolError(f"order {o.id} is {o.status}; only delivered items can be returned")
        if i.state != "ordered":
            raise ToolError(f"item {i.id} was already {i.state}")
        i.state = "returned"
        return f"Item {i.id} ({i.product}) returned; {money(i.cents)} refunded to the original payment method."

    @tool
    def exchange_item(self, order_id: str, item_id: str, new_value: str) -> str:
        """Exchange one delivered item for the same product in another color or size, at no cost.

        Args:
            order_id: The order id.
            item_id: The item's id, as get_order shows it.
            new_value: The new color or size, e.g. 'blue' or 'M'.
        """
        o = self._order(order_id)
        i = self._item(o, item_id)
        if o.status != "delivered":
            raise ToolError(f"order {o.id} is {o.status}; only delivered items can be exchanged")
        if i.state != "ordered":
            raise ToolError(f"item {i.id} was already {i.state}")
        value = new_value.strip()
        if i.option == "size":
            value = value.upper()
            if value not in SIZES:
                raise ToolError(f"{new_value!r} is not a size (sizes: {', '.join(SIZES)})")
        elif value.lower() not in COLORS:
            raise ToolError(f"{new_value!r} is not a color we make")
        else:
            value = value.lower()
        if value == i.value:
            raise ToolError(f"item {i.id} already is {i.option} {value}")
        i.value, i.state = value, "exchanged"
        return f"Item {i.id} ({i.product}) exchanged for {i.option} {value}; the new one ships today."


# ----------------------------------------------------------------------------- tasks

TEMPLATES = {
    "status": ("Hi, where is my order with the {product}?", "Has my {product} shipped yet?",
               "I'm waiting for a {product} I ordered. What's its status?",
               "Can you check on the {product} I bought?"),
    "cancel": ("Please cancel my order with the {product} in it.", "I want to cancel the order that has my {product}.",
               "I changed my mind about the {product}; can you cancel that order?",
               "Cancel the order with the {product}, please."),
    "return": ("Hi, I want to return the {product} I ordered.", "The {product} I got isn't right; can I send it back?",
               "I'd like a refund for my {product}.", "How do I return the {product} I bought?"),
    "exchange": ("I'd like to exchange my {product} for a different {option}.",
                 "The {product} I received is the wrong {option}; can I swap it?",
                 "Can I get my {product} in another {option}?",
                 "Please exchange the {product} I bought for another {option}."),
}
# family -> the request the user makes (its templates and its scripted goal)
INTENTS = {"status": "status", "cancel": "cancel", "cancel_refused": "cancel", "return": "return",
           "exchange": "exchange", "late": None, "declined": None}
FAMILIES = {f: None for f in INTENTS}
Q_EMAIL = ("Could you tell me the email address on your account?", "What is the email address on your account?",
           "Sure, I can help. What's the email address on your account?")


@dataclass
class Plan:
    intent: str
    user: User
    customer: Customer
    order: Order
    item: Item


class SupportWorkflow(Workflow):
    name = "support"
    instructions = f"""You are a customer-service agent for an online store. Follow the policy:
1. Identify the customer first: ask for the email address on their account and look it up.
2. Only orders that are still processing can be cancelled; shipped or delivered orders cannot.
3. Delivered items can be returned (refunding their price) or exchanged for another color or size
of the same product within {WINDOW} days of delivery; after that, refuse.
4. Before cancelling, returning or exchanging, say what you will do and ask the customer to
confirm; act only if they say yes.
5. End with a short reply that tells the customer the outcome: the refund, the new option, the
tracking number, or why the request cannot be granted."""
    grammar = Phrasing({r"order": ("purchase",), r"changed my mind": ("had second thoughts",),
                        r"shipped": ("been sent", "gone out"), r"where is": ("what happened to",),
                        r"check on": ("look into", "find out about"), r"bought": ("purchased", "got"),
                        r"waiting for": ("still waiting on",), r"status": ("state",), r"hi": ("hello",)})

    def _build(self, split: str, index: int, seed: int) -> tuple[Task, Plan, list[Customer]]:
        db = build_db(seed, split, self.test_share)
        rng = random.Random(seed ^ 0x5099)
        colors = pool("color", split, self.test_share)

        def sample(family: str):
            customer = rng.choice(db)
            order = rng.choice(customer.orders)
            item = rng.choice(order.items)
            others = [i.product for o in customer.orders for i in o.items if i is not item]
            if item.product in others:
                resample()  # the user names one product: it must identify one item
            intent = INTENTS[family] or rng.choice(("return", "exchange") + (("cancel",) if family == "declined" else ()))
            if intent == "status":
                order.status = rng.choice(("processing", "shipped", "delivered"))
            elif family == "cancel" or (family == "declined" and intent == "cancel"):
                order.status = "processing"
            elif family == "cancel_refused":
                order.status = rng.choice(("shipped", "delivered"))
            else:
                order.status = "delivered"
            order.days = (rng.randint(WINDOW + 1, 90) if family == "late" else rng.randint(1, WINDOW)
                          ) if order.status == "delivered" else 0
            order.tracking = f"1Z{rng.randrange(16 ** 8):08X}" if order.status == "shipped" else ""
            for i in order.items:
                i.state = "ordered"
            choices = [v for v in (colors if item.option == "color" else SIZES) if v != item.value]
            new_value = rng.choice(choices) if intent == "exchange" else ""
            return intent, customer, order, item, new_value

        family, (intent, customer, order, item, new_value) = draw_family(rng, FAMILIES, sample, seed)
        params = {"product": item.product, "option": item.option}
        goal = TEMPLATES[intent][0].format(**params)
        user = User(customer.email, goal, new_value, confirms=family != "declined")
        gold_db = build_db(seed, split, self.test_share)  # the same draws, then the right action applied
        plan = Plan(intent, user, customer, order, item)
        facts = self._apply(plan, gold_db)
        gold = {"kind": "support", "state": digest(gold_db), "facts": facts}
        # the db the task runs on is `db` as modified by sample(); gold_db needs the same modification
        task = self.make_task(rng, split, index, seed, family, TEMPLATES[intent], params, gold, f"support-{intent}")
        return task, plan, db

    def _apply(self, plan: Plan, gold_db: list[Customer]) -> list[str]:
        """Apply the policy's outcome of `plan` to `gold_db` (a fresh build of the task's draws, to
        which the family's order state is copied) and return the facts the answer must contain."""
        o = next(x for c in gold_db for x in c.orders if x.id == plan.order.id)
        o.status, o.days, o.tracking = plan.order.status, plan.order.days, plan.order.tracking
        for mine, theirs in zip(o.items, plan.order.items):
            mine.state, mine.value = theirs.state, theirs.value
        item = next(i for i in o.items if i.id == plan.item.id)
        if plan.intent == "status":
            return [{"processing": "processing", "shipped": o.tracking, "delivered": "delivered"}[o.status]]
        if not plan.user.confirms:
            return ["no changes"]
        if plan.intent == "cancel":
            if o.status != "processing":
                return [o.status]
            o.status = "cancelled"
            return [money(o.cents)]
        if o.days > WINDOW:
            return [f"{WINDOW} days"]
        if plan.intent == "return":
            item.state = "returned"
            return [money(item.cents)]
        item.state, item.value = "exchanged", plan.user.new_value
        return [plan.user.new_value]

    def sample_task(self, split: str, index: int, seed: int) -> Task:
        return self._build(split, index, seed)[0]

    def make_env(self, task: Task) -> SupportEnv:
        _, plan, db = self._build(task.split, task.index, task.seed)
        return SupportEnv(db, plan.user)

    def teacher(self, task: Task, env: SupportEnv):
        plan = self._build(task.split, task.index, task.seed)[1]
        rng = random.Random(task.seed ^ 0x7EAC)
        product = plan.item.product
        obs = yield Call("ask_user", {"question": rng.choice(Q_EMAIL)},
                         rng.choice(("First I need to identify the customer.", "The policy says to identify the customer first.")))
        email = re.search(r"[\w.+-]+@[\w.-]+\w", obs.text).group(0)
        obs = yield Call("find_customer", {"email": email}, f"Looking up {email}.")
        oid = next(line.split(" | ")[0] for line in obs.text.splitlines()
                   if " | " in line and product in line.split(" | ")[2].split(", "))
        obs = yield Call("get_order", {"order_id": oid}, rng.choice((
            f"The {product} is in order {oid}; checking it.", f"Order {oid} has the {product}. Let me open it.")))
        status = re.search(r"^status: (\w+)", obs.text, re.M).group(1)
        row = next(line.split(" | ") for line in obs.text.splitlines() if line.count(" | ") == 4 and line.split(" | ")[1] == product)
        iid, (option, value), price = row[0], row[2].split(" ", 1), row[3]
        total = re.search(r"^total: (\S+)", obs.text, re.M).group(1)

        if plan.intent == "status":
            if status == "shipped":
                tracking = re.search(r"tracking (\w+)", obs.text).group(1)
                yield Answer(f"Order {oid} with your {product} has shipped; the tracking number is {tracking}.",
                             "It has shipped; I'll give the tracking number.")
            elif status == "delivered":
                days = re.search(r"delivered (\d+) days ago", obs.text).group(1)
                yield Answer(f"Order {oid} with your {product} was delivered {days} days ago.", "It was delivered.")
            else:
                yield Answer(f"Order {oid} with your {product} is still processing; it has not shipped yet.",
                             "It is still processing.")
            return
        if plan.intent == "cancel":
            if status != "processing":
                word = "shipped" if status == "shipped" else "been delivered"
                yield Answer(f"I'm sorry, order {oid} has already {word}, so it can no longer be cancelled.",
                             f"The order is {status}; the policy allows cancelling only processing orders.")
                return
            obs = yield Call("ask_user", {"question": f"Order {oid} is still processing, so I can cancel it and "
                                                      f"refund {total}. Shall I go ahead?"},
                             "It is still processing, so it can be cancelled. I need the customer's confirmation.")
            if not obs.text.startswith("Yes"):
                yield Answer(f"Understood: I made no changes to order {oid}.", "The customer declined.")
                return
            yield Call("cancel_order", {"order_id": oid}, "Confirmed; cancelling.")
            yield Answer(f"I cancelled order {oid}; {total} will be refunded to your original payment method.",
                         "The order is cancelled.")
            return
        days = int(re.search(r"delivered (\d+) days ago", obs.text).group(1))
        verb = "return" if plan.intent == "return" else "exchange"
        if days > WINDOW:
            yield Answer(f"I'm sorry, the {product} was delivered {days} days ago; returns and exchanges are only "
                         f"accepted within {WINDOW} days of delivery, so I can't {verb} it.",
                         f"It was delivered {days} days ago, more than {WINDOW}: the policy says to refuse.")
            return
        if verb == "return":
            question = f"I can return the {product} from order {oid} and refund {price}. Shall I go ahead?"
            why = f"Delivered {days} days ago, within {WINDOW} days: it can be returned once the customer confirms."
        else:
            obs = yield Call("ask_user", {"question": f"Which {option} would you like instead?"},
                             f"Delivered {days} days ago, within {WINDOW} days, so it can be exchanged. "
                             f"I need the {option} they want.")
            new = obs.text.split(",")[0]
            question = f"I can exchange your {product} ({option} {value}) for {option} {new}. Shall I go ahead?"
            why = "I'll confirm the exchange first."
        obs = yield Call("ask_user", {"question": question}, why)
        if not obs.text.startswith("Yes"):
            yield Answer(f"Understood: I made no changes to order {oid}.", "The customer declined.")
            return
        if verb == "return":
            yield Call("return_item", {"order_id": oid, "item_id": iid}, "Confirmed; returning the item.")
            yield Answer(f"Your return of the {product} is done: {price} will be refunded to your original "
                         "payment method.", "The return went through.")
        else:
            yield Call("exchange_item", {"order_id": oid, "item_id": iid, "new_value": new}, "Confirmed; exchanging.")
            yield Answer(f"Done: your {product} will be exchanged for {option} {new}.", "The exchange went through.")

    def mistake(self, task: Task, env: SupportEnv, call: Call, rng: random.Random) -> Mistake | None:
        """A mistyped email address (two letters swapped), or an item id that is not in the order."""
        if call.tool == "find_customer":
            email = call.args["email"]
            local = email.split("@")[0]
            spots = [k for k in range(len(local) - 1) if local[k] != local[k + 1] and local[k].isalpha()
                     and local[k + 1].isalpha()]
            if not spots:
                return None
            k = rng.choice(spots)
            wrong = email[:k] + email[k + 1] + email[k] + email[k + 2:]
            if any(c.email == wrong for c in env.customers):
                return None
            return Mistake(Call("find_customer", {"email": wrong}, call.reasoning),
                           f"I mistyped the address; the customer said {email}.")
        if call.tool in ("return_item", "exchange_item"):
            order = env.orders[call.args["order_id"]]
            good = call.args["item_id"]
            wrong = f"I{(int(good[1:]) + rng.randint(1, 9)) % 100000:05d}"
            if any(i.id == wrong for i in order.items):
                return None
            product = next(i.product for i in order.items if i.id == good)
            return Mistake(Call(call.tool, call.args | {"item_id": wrong}, call.reasoning),
                           f"Wrong item id: the {product} is item {good}.")
        return None

    def lookaround(self, call: Call) -> str | None:
        """Looking a customer or an order up changes nothing."""
        if call.tool == "find_customer":
            return "customer:" + str(call.args.get("email", "")).strip().lower()
        if call.tool == "get_order":
            return "order:" + str(call.args.get("order_id", "")).strip()
        return None

    def state_key(self, env: SupportEnv) -> str:
        return digest(env.customers)

    def check(self, task: Task, env: SupportEnv, answer: str) -> Verdict:
        state = digest(env.customers)
        if state != task.gold["state"]:
            return Verdict(False, "the database does not end in the gold state")
        missing = [f for f in task.gold["facts"] if f.casefold() not in answer.casefold()]
        if missing:
            return Verdict(False, f"the answer does not tell the customer {missing}: {answer!r}")
        return Verdict(True)


WORKFLOW = SupportWorkflow
