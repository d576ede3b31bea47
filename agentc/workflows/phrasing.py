"""Many wordings of one question: the paraphrase grammar every workflow's prompts go through.

A workflow writes a few templates per question family ("How many customers live in {city}?").
`Phrasing.word` turns the chosen template into one user message, seeded by the task, in stages:

    synonyms      "how many" -> "what number of", "customers" -> "clients", "canceled" ...
                  (SHARED below, plus the workflow's own `synonyms`)
    clause order  "Excluding cancelled orders, what was ...?" <-> "What was ... excluding cancelled orders?"
    register      neutral, terse ("city count for Paris" style: no capital, no final mark),
                  polite ("Could you help me with this? ..."), chatty ("Hi there! ... Thanks a lot!")
    formats       numbers the workflow names (3 / three / 1,250) and ISO dates (2024-03-05 /
                  March 5, 2024 / 5 March 2024 / Mar 5 2024)
    noise         lower-case text and typos (swapped, dropped, doubled letters), never inside a slot

Slot values (names, paths, numbers) are never touched by synonyms or noise, so the task's facts
stay exact; only the words around them vary. A wording's *skeleton* is the text with slots left as
`{name}` (and the formats and register named): the count of distinct skeletons is the number of
distinct wordings a family has (`python -m agentc.data.generate ... ` reports it per family).

The splits: whole templates are held out of training (`heldout_templates` in base.py), and so is a
share of the (template, register) *combinations* of the remaining templates
(`heldout_combinations`, beside it). The test split draws every template in every register, so
each test task is `seen` (its template and its combination both occur in training), `combination`
(both parts occur, never together) or `template`.
`rich=False` (the workflow's `phrasing="plain"`) words train tasks exactly as the template is
written: neutral register, no synonyms, no noise; the test split is always worded richly, so
plain and rich training are measured on the same test tasks.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

REGISTERS = ("neutral", "terse", "polite", "chatty")
COMBINATION_SHARE = 0.25  # of the (template, register) pairs of train templates, held out of training

# Phrase -> alternatives (a regex, matched case-insensitively at word boundaries; the first letter's
# case is kept). Chosen so the meaning cannot change in any workflow's templates.
SHARED = {
    r"how many(?! of)": ("what number of",),
    r"how many of": ("what number of",),
    r"what is": ("what's",),
    r"(?<!: )count the": ("tally the", "give me the count of the"),   # not a spec's "f(x): count the ..."
    r"(?:^|(?<=[.?!:] ))list": ("show",),   # the verb only, never "the list xs"
    r"find": ("look up",),
    r"name the": ("identify the",),
    r"(?<!, )which": ("what",),             # not a relative clause (", which filters")
    r"excluding": ("leaving out", "not counting", "ignoring"),
    r"not counting": ("excluding", "ignoring"),
    r"cancelled(?= (?:orders?|ones)\b)": ("canceled",),   # never the status value a task writes
    r"(?<!on )average": ("mean",),
    r"mean": ("average",),
    r"(?<!in )total(?! of)": ("overall",),
    r"delete": ("remove", "erase"),
    r"every(?= [a-z])": ("each",),
    r"i need": ("i want", "i'd like"),
    r"the number of": ("the count of",),
    r"directory": ("folder",),
    r"largest": ("biggest", "highest"),
    r"how much(?= (?:has|did|does)\b)": ("what amount",),
    r"give": ("provide",),
    r"another": ("a different",),
    r"can i": ("could I", "may I"),
    r"(?<!at )all(?= (?!of\b)[a-z])": ("all the",),
    r"function": ("helper",),
}

# Fronted adverbials that may move to the end of their sentence, and trailing ones that may move
# to the front (clause order); the synonyms above can produce any of them.
FRONT = re.compile(r"^((?:In|Ignoring|Excluding|Leaving out|Not counting|On average|For) [^,?.]+), (.+?)([?.])$")
BACK = re.compile(r"^(.+?), ((?:excluding|leaving out|not counting|ignoring(?! case)) [^,?.]+)([?.])$")

FRAMES = {  # (prefix, suffix) per register; "{}" is the question
    "neutral": (("", ""),),
    "terse": (("", ""), ("q: ", ""), ("", " - thx")),
    "polite": (("Could you help me with this? ", ""), ("Hello. ", " Thank you."), ("", " Thanks in advance."),
               ("I'd appreciate your help: ", ""), ("Good morning! ", " Many thanks.")),
    "chatty": (("Hi there! Quick one for you. ", " Thanks a lot!"), ("Hey, hope your day is going well. ", ""),
               ("Okay, quick question: ", " Cheers!"), ("Right, here's what I need. ", " No rush."),
               ("Hiya! ", " You're a star.")),
}

SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen twenty").split()
MONTHS = ("January February March April May June July August September October November December").split()
ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
NUMBER_STYLES = ("digits", "words", "grouped")   # words: 0-20 only; grouped: 1,250 (not years)
DATE_STYLES = ("iso", "long", "day_month", "short")
WORD = re.compile(r"\b[a-z]{4,}\b")   # what typos may touch: plain lower-case words of 4+ letters


def _compile(synonyms: dict[str, tuple[str, ...]]) -> re.Pattern:
    keys = sorted(synonyms, key=len, reverse=True)
    return re.compile("|".join(rf"(?P<k{i}>\b(?:{k})\b)" for i, k in enumerate(keys)), re.I), keys


def _match_case(like: str, text: str) -> str:
    return text[:1].upper() + text[1:] if like[:1].isupper() else text


def _lower_first(text: str) -> str:
    return text if text.startswith("{") or text[:2].isupper() else text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pieces(template: str) -> list[tuple[bool, str]]:
    """(is_slot, text) pieces of a format template; slots keep their braces."""
    return [(False, p) if i % 2 == 0 else (True, p) for i, p in enumerate(re.split(r"(\{[^{}]*\})", template))]


def _on_text(template: str, fn) -> str:
    """Apply fn to the literal text of a template, never to its {slots}."""
    return "".join(p if slot else fn(p) for slot, p in _pieces(template))


def _slot_names(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def format_number(n: int, style: str) -> str:
    if style == "words" and 0 <= n < len(SMALL):
        return SMALL[n]
    if style == "grouped" and not 1900 <= n <= 2100:
        return f"{n:,}"
    return str(n)


def format_date(iso: str, style: str) -> str:
    y, m, d = (int(x) for x in ISO_DATE.match(iso).groups())
    month = MONTHS[m - 1]
    return {"iso": iso, "long": f"{month} {d}, {y}", "day_month": f"{d} {month} {y}",
            "short": f"{month[:3]} {d} {y}"}[style]


def typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double"))
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i + 1:] if kind == "drop" else word[:i] + word[i] + word[i:]


@dataclass(frozen=True)
class Wording:
    prompt: str
    skeleton: str     # the wording with its slots unfilled and its noise left out (what is counted)


class Phrasing:
    """The grammar of one workflow: its synonyms on top of SHARED, and which slots hold numbers or
    dates that may be written in other formats. Rates are per wording (casing) and per word (typo)."""

    def __init__(self, synonyms: dict | None = None, number_slots=(), date_slots=(), protect=(),
                 lower_rate: float = 0.1, typo_rate: float = 0.03, reorder_rate: float = 0.5,
                 synonym_rate: float = 0.5):
        """protect: words that typos never touch (a code task's argument named `text`)."""
        self.synonyms = SHARED | (synonyms or {})
        self.protect = frozenset(protect)
        self.pattern, self.keys = _compile(self.synonyms)
        self.number_slots, self.date_slots = frozenset(number_slots), frozenset(date_slots)
        self.lower_rate, self.typo_rate = lower_rate, typo_rate
        self.reorder_rate, self.synonym_rate = reorder_rate, synonym_rate

    def synonymise(self, text: str, rng: random.Random) -> str:
        def pick(m: re.Match) -> str:
            alts = self.synonyms[self.keys[int(m.lastgroup[1:])]]
            if rng.random() >= self.synonym_rate:
                return m.group(0)
            return _match_case(m.group(0), rng.choice(alts))
        return self.pattern.sub(pick, text)

    def reorder(self, template: str, rng: random.Random) -> str:
        sentences = re.split(r"(?<=[?.]) (?=[A-Z{])", template)
        out = []
        for s in sentences:
            if (m := FRONT.match(s)) and rng.random() < self.reorder_rate:
                s = f"{_upper_first(m.group(2))} {_lower_first(m.group(1))}{m.group(3)}"
            elif (m := BACK.match(s)) and rng.random() < self.reorder_rate:
                s = f"{_upper_first(m.group(2))}, {_lower_first(m.group(1))}{m.group(3)}"
            out.append(s)
        return " ".join(out)

    def frame(self, template: str, register: str, rng: random.Random) -> str:
        prefix, suffix = rng.choice(FRAMES[register])
        if re.match(r"(?:Hi|Hello)\b", template):
            prefix = ""                    # the template greets already
        open_end = bool(re.search(r"\}[.?]?$", template))   # ends in free text (a file's content, a value)
        if open_end:
            suffix = ""                    # nothing may run on into it
        if register == "terse":
            template = template.replace(". Please ", ". ").replace("Please ", "").replace(", please", "")
            template = _lower_first(template if open_end else re.sub(r"[?.]$", "", template))
        elif prefix.endswith(": "):  # "I'd appreciate your help: how many ..."; after a greeting, a capital
            template = _lower_first(template)
        return f"{prefix}{template}{suffix}"

    def formats(self, template: str, params: dict, rng: random.Random) -> tuple[dict, str]:
        """The params as text in one number style and one date style for this wording, and the
        styles' names for the skeleton. Words are used only for a slot that stands between spaces (or
        before a sentence mark) wherever it occurs, never next to '%', brackets, quotes or after an
        operator ("== sixteen")."""
        n_style, d_style = rng.choice(NUMBER_STYLES), rng.choice(DATE_STYLES)
        out, used = dict(params), []
        for name in set(_slot_names(template)):
            value = params.get(name)
            if name in self.number_slots and isinstance(value, int) and not isinstance(value, bool):
                style = n_style
                spots = [m.start() for m in re.finditer(re.escape(f"{{{name}}}"), template)]
                if style == "words" and not all(re.match(rf"(^| )\{{{name}\}}($|[ .?,;])", template[max(0, i - 1):])
                                                and not re.search(r"[=<>+*/-] $", template[:i]) for i in spots):
                    style = "digits"
                out[name] = format_number(value, style)
                used.append(f"{name}:{style}")
            elif name in self.date_slots and isinstance(value, str) and ISO_DATE.match(value):
                out[name] = format_date(value, d_style)
                used.append(f"{name}:{d_style}")
        return out, ",".join(sorted(used))

    def noise(self, template: str, rng: random.Random) -> str:
        if rng.random() < self.lower_rate:
            template = _on_text(template, lambda t: re.sub(r"\b[A-Z][a-z]+\b", lambda m: m.group(0).lower(), t))
        if self.typo_rate:
            template = _on_text(template, lambda t: WORD.sub(
                lambda m: typo(m.group(0), rng) if m.group(0) not in self.protect and rng.random() < self.typo_rate
                else m.group(0), t))
        return template

    def word(self, template: str, params: dict, register: str, rng: random.Random, rich: bool = True) -> Wording:
        """One wording of `template` with `params`. rich=False: the template as written."""
        if not rich:
            return Wording(template.format(**params), template)
        text = _on_text(template, lambda t: self.synonymise(t, rng))
        text = self.frame(self.reorder(text, rng), register, rng)
        values, styles = self.formats(text, params, rng)
        skeleton = f"{text} [{register}{'; ' + styles if styles else ''}]"
        return Wording(self.noise(text, rng).format(**values), skeleton)
