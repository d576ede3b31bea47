"""The runtime's engine: a model, a static KV cache of B rows, and the decoding state of each row.

    engine = Engine(model, tok, max_len=4096)                  # one row: one episode at a time
    logits = engine.feed(prompt_ids, first=True)               # prefill in chunks at the row's offset
    out = engine.decode(logits, max_new=512)                   # sample up to <|/call|> or <|end|>

    engine = Engine(model, tok, max_len=4096, rows=16)         # 16 episodes advance together
    engine.start(row, seed); logits = engine.feed(ids, row=row)   # a prefill touches one row
    engine.begin_turn(row, logits, max_new); engine.step()      # one token for every decoding row

Injected tokens (a prompt, an observation) are prefilled in one forward per chunk at the row's
offset; nothing is re-encoded. Sampled tokens are decoded one per step, for every row that is in
a turn, in one batched forward; the runtime's scheduler (agentc/runtime/episode.py) prefills an
observation into its row between two such steps, so a row whose tool is running leaves the decode
batch and the others go on. A row's decoding depends only on its own tokens: in float32 greedy
decoding an episode's tokens are the same in a batch as alone (tests/test_batch.py).

Sampling follows the token layout's grammar (reasoning, then <|call|> JSON <|/call|> or
<|answer|> text <|end|>): tokens only the runtime writes are never sampled, and with a CallGrammar
(agentc/runtime/constrain.py) the JSON inside <|call|> follows the agent's tool schemas.
A fixed prefix (the system prompt and tool manifest) is prefilled once per engine: `feed(...,
prefix=n)` copies the cached keys and values of the first n tokens into the row when they match.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from agentc.data.format import ANSWER, CALL, CALL_END, END
from agentc.model.kv_cache import CacheFull, KVCache
from agentc.model.quant import is_quantized

MODES = ("incremental", "reprefill", "tokenwise")
KV_DTYPES = ("auto", "float32", "bfloat16")
# Prompt-lookup drafts are off by default: on a 2-core CPU a compiled 5-token verify step costs
# ~3.8x a 1-token one, more than the ~1.3 tokens a verify keeps on SQL (RESULTS, "The runtime")
DEFAULT_DRAFT = 0
_warned: set = set()


class BadLogits(ValueError):
    """Logits no token can be sampled from: NaN, +inf, or -inf for every token the layout allows
    (a numerically broken model; the runtime reports it as a bad_logits failure)."""


def new_stats() -> dict:
    # prefill: injected tokens run in chunks (a sampled stop token rides with the next chunk);
    # reencode: what an orchestration loop would prefill; forward: every token through the model;
    # prefix: tokens whose keys and values came from the cached prefix
    # drafted: prompt-lookup tokens verified; accepted: those the model would have written anyway
    return {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0,
            "reencode_tokens": 0, "forward_tokens": 0, "prefix_tokens": 0, "drafted": 0, "accepted": 0}


def lookup_draft(ids: list[int], grams: dict, k: int, sizes=(3, 2)) -> list[int]:
    """Prompt-lookup drafting: the k tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (n from `sizes`, longest first), or [] when it never occurred.
    Agents copy ids, names and numbers from observations into calls and answers, so the context
    often holds what comes next. grams: {n: {n-gram: end position}} for this sequence, brought up
    to date here (n-grams that end before the last token, so the tail never finds itself)."""
    for n in sizes:
        index = grams.setdefault(n, {0: n})  # key 0: the next end position to index
        for end in range(index[0], len(ids)):
            index[tuple(ids[end - n:end])] = end
        index[0] = max(index[0], len(ids))
        at = index.get(tuple(ids[-n:])) if len(ids) > n else None
        if at is not None:
            return ids[at:at + k]
    return []


@dataclass
class Row:
    """The state of one cache row: the sequence it holds and the turn it is decoding."""
    gen: torch.Generator
    ids: list[int] = field(default_factory=list)      # the sequence the cache row holds
    pending: list[int] = field(default_factory=list)  # a sampled stop token, fed with whatever follows it
    stats: dict = field(default_factory=new_stats)
    # the turn being decoded
    logits: torch.Tensor | None = None  # next-token logits, not yet sampled from
    out: list[int] = field(default_factory=list)
    max_new: int = 0
    opened: int | None = None           # the <|call|> or <|answer|> this turn has opened
    grammar_state: object = None        # inside <|call|>: where the JSON is
    policy: object = None               # policy(logits) -> token replaces sampling (tests force transcripts)
    on_token: object = None
    full: bool = False                  # the turn stopped because the cache is full
    bad_logits: str | None = None       # why the turn stopped on logits it cannot sample from
    decoding: bool = False
    ahead: int | None = None            # a token chosen while verifying a draft, fed at the next step
    grams: dict = field(default_factory=dict)  # prompt-lookup index of ids (lookup_draft)


class Engine:
    """A model with a static KV cache of `rows` rows and each row's decoding state.

    mode: how injected tokens reach the model (one row only). "incremental" is the runtime. The
    other two are baselines, kept for experiments/bench_runtime.py and the tests, which measure what
    the design saves: "reprefill" re-encodes the whole context at every step (an orchestration
    loop), "tokenwise" feeds an observation one token at a time (a plain generate() loop).
    `record=True` keeps (position, logits) of every forward chunk (one row only).

    Decoding speed (none changes what greedy decoding writes; tests/test_engine_fast.py):
      compile   decode steps as compiled graphs (agentc/model/decode.py); None: yes unless the
                environment sets AGENTC_COMPILE=0. A graph that fails to compile warns once and the
                engine decodes eagerly.
      kv_dtype  the cache's dtype: "auto" is bfloat16 for an int8 or bf16 model (half the bytes
                read per step at long context) and the model's dtype for a float32 one
      draft     prompt-lookup drafting: up to `draft` tokens copied from the row's own context are
                verified in one forward; a token is kept only where the model would have written
                it (0: off)
      interleave  the batched scheduler (runtime/episode.py) prefills a longer observation this many
                tokens at a time between the other rows' decode steps (0: in one go)"""

    def __init__(self, model, tok, max_len: int = 4096, mode: str = "incremental", prefill_chunk: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, record: bool = False,
                 rows: int = 1, grammar=None, compile: bool | None = None, kv_dtype: str = "auto",
                 draft: int = DEFAULT_DRAFT, interleave: int = 256):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        if rows > 1 and (mode != "incremental" or record):
            raise ValueError("a batched engine runs the incremental mode without recording")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
        if draft < 0:
            raise ValueError(f"draft must be 0 (off) or a number of tokens, got {draft}")
        self.model, self.tok, self.mode = model, tok, mode
        self.max_len, self.prefill_chunk = max_len, max(1, prefill_chunk)
        self.temperature, self.top_p, self.grammar = temperature, top_p, grammar
        p = next(model.parameters())
        self.device = p.device
        # the first parameter is the float embedding (an int8 model's weights are buffers)
        if kv_dtype == "auto":
            kv_dtype = "bfloat16" if is_quantized(model) or p.dtype == torch.bfloat16 else str(p.dtype)[6:]
        self.cache = KVCache(model.cfg, max_len, rows, p.device, getattr(torch, kv_dtype))
        if compile is None:
            compile = os.environ.get("AGENTC_COMPILE", "1") != "0"
        self.graphs = None
        if compile and mode == "incremental" and not record:
            from agentc.model.decode import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.cache)
        self.draft = draft if mode == "incremental" and not record else 0
        self.interleave = max(0, interleave)
        # The runtime's own tokens are never sampled, and the model's follow the layout's grammar:
        # reasoning, then <|call|> JSON <|/call|> or <|answer|> text <|end|>. Training data always
        # does, so the constraint removes no mass a well-trained model would give a valid token.
        sid = tok.special_ids
        own = {sid[t] for t in (CALL, CALL_END, ANSWER, END)}
        never = [i for i in tok.unsampled_ids() if i not in own]  # other specials, <unk>, PRESPLIT
        never += list(range(tok.vocab_size, model.cfg.vocab_size))  # embedding rows with no piece
        # one (3, vocab) mask: row 0/1/2 for nothing / <|call|> / <|answer|> opened so far
        banned = [(CALL_END, END), (CALL, ANSWER, END), (CALL, ANSWER, CALL_END)]
        self.opened_index = {None: 0, sid[CALL]: 1, sid[ANSWER]: 2}
        self.ban_mask = torch.zeros(3, model.cfg.vocab_size, dtype=torch.bool, device=p.device)
        for i, names in enumerate(banned):
            self.ban_mask[i, never + [sid[t] for t in names]] = True
        self.call_id = sid[CALL]
        self.openers = {sid[CALL], sid[ANSWER]}
        self.stop = {sid[CALL_END], sid[END]}
        self.record, self.logits = record, []
        self.prefixes: dict[tuple, tuple] = {}  # prefix token ids -> its keys and values
        self.rows = [Row(torch.Generator().manual_seed(seed)) for _ in range(rows)]
        self.step_s = 0.0  # wall time of batched decode steps (all rows together)

    # ----------------------------------------------------------------- one row's state

    def start(self, row: int, seed: int) -> None:
        """Empty `row` for a new episode whose sampling seed is `seed`."""
        self.cache.reset(row)
        self.rows[row] = Row(torch.Generator().manual_seed(seed))

    # the one-row API's view of row 0
    ids = property(lambda self: self.rows[0].ids)
    pending = property(lambda self: self.rows[0].pending)
    stats = property(lambda self: self.rows[0].stats)
    full = property(lambda self: self.rows[0].full)
    bad_logits = property(lambda self: self.rows[0].bad_logits)

    # ----------------------------------------------------------------- forward passes

    @torch.no_grad()
    def _forward(self, row: int, ids: list[int]) -> torch.Tensor:
        """Run ids through the model at `row`'s offset, in chunks of prefill_chunk; the logits
        (vocab,) of the last one."""
        last = None
        self.rows[row].stats["forward_tokens"] += len(ids)
        self.cache.bind([row])
        for s in range(0, len(ids), self.prefill_chunk):
            x = torch.tensor([ids[s:s + self.prefill_chunk]], device=self.device)
            start = self.cache.pos
            h = self.model.hidden(x, cache=self.cache)
            if self.record:
                self.logits.append((start, self.model.head(h[0]).float()))
            last = h[0, -1]
        return self.model.head(last).float()

    def _prefix(self, row: int, ids: list[int], n: int) -> int:
        """Put the keys and values of ids[:n] into the empty `row` from the prefix cache,
        computing them once; the number of tokens now in the row."""
        key = tuple(ids[:n])
        if key not in self.prefixes:
            self._forward(row, ids[:n])
            self.prefixes = {key: self.cache.copy_out(row, n)}  # one agent, one prefix: keep the last
        else:
            self.cache.copy_in(row, *self.prefixes[key])
        self.rows[row].stats["prefix_tokens"] += n
        return n

    def check_room(self, row: int, n: int) -> None:
        """CacheFull unless n more injected tokens (and a pending stop token) fit in `row`."""
        r = self.rows[row]
        if len(r.ids) + len(r.pending) + n > self.max_len:
            raise CacheFull(f"{len(r.ids)} tokens + {len(r.pending) + n} new exceed the cache of {self.max_len}")

    def feed(self, ids: list[int], first: bool = False, row: int = 0, prefix: int = 0) -> torch.Tensor:
        """Append injected tokens (the prompt, an observation) to `row`; the next-token logits.
        prefix: on the first feed, how many leading tokens are the agent's fixed prefix (their
        keys and values are computed once per engine and copied). Raises CacheFull, before any
        chunk runs, if they do not fit."""
        r = self.rows[row]
        t0 = time.perf_counter()
        self.check_room(row, len(ids))  # before any chunk runs: all or nothing
        ids, r.pending = r.pending + list(ids), []
        r.stats["reencode_tokens"] += len(r.ids) + len(ids)  # what re-encoding would have run
        if self.mode == "reprefill" and not first:
            self.cache.reset(row)
            r.ids = r.ids + list(ids)
            n, logits = len(r.ids), self._forward(row, r.ids)
        elif self.mode == "tokenwise" and not first:
            r.ids.extend(ids)
            n = len(ids)
            for i in ids:
                logits = self._forward(row, [i])
        else:
            skip = self._prefix(row, ids, prefix) if first and 0 < prefix < len(ids) and not self.record else 0
            r.ids.extend(ids)
            n, logits = len(ids) - skip, self._forward(row, list(ids[skip:]))
        r.stats["prefill_tokens"] += n
        r.stats["prefill_s"] += time.perf_counter() - t0
        return logits

    # ----------------------------------------------------------------- sampling

    def sample(self, logits: torch.Tensor, opened: int | None = None, row: int = 0, state=None) -> int:
        """A token from the next-token logits; `opened`: the <|call|> or <|answer|> this turn has
        opened, if any (it decides which special tokens may come); `state`: inside a call with a
        grammar, where its JSON is. Raises BadLogits."""
        logits = logits.masked_fill(self.ban_mask[self.opened_index[opened]], -math.inf)
        top = logits.max()  # NaN if any allowed logit is NaN
        if not torch.isfinite(top):
            raise BadLogits(f"the model's logits are not finite numbers (the largest allowed is {top.item()})")
        gen = self.rows[row].gen
        if state is not None:
            return self.grammar.pick(state, logits, self.temperature, self.top_p, gen)
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax((logits - top) / self.temperature, dim=-1).cpu()  # largest 0: nothing overflows
        if self.top_p < 1:  # nucleus: the smallest set of tokens whose mass reaches top_p
            p, order = probs.sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _next(self, row: int, pick: tuple | None = None) -> int | None:
        """Sample `row`'s next token of its turn from r.logits and record it; None when the turn is
        over. pick: (argmax, max) of the allowed logits, read for every greedy row in one go."""
        r = self.rows[row]
        try:
            if r.policy:
                nxt = r.policy(r.logits)
            elif pick is not None:
                nxt = self._take(r, row, pick)
            else:
                nxt = self.sample(r.logits, r.opened, row, r.grammar_state)
        except BadLogits as e:
            r.bad_logits = str(e)
            return None
        r.out.append(nxt)
        if nxt in self.openers:
            r.opened = nxt
            if nxt == self.call_id and self.grammar is not None:
                r.grammar_state = self.grammar.start()
        elif r.grammar_state is not None and nxt not in self.stop and not r.policy:
            r.grammar_state = self.grammar.advance(r.grammar_state, nxt)
        if r.on_token:
            r.on_token(r.out)
        return nxt

    def _take(self, r: Row, row: int, pick: tuple) -> int:
        """The greedy token from a pick, as sample() would choose it (the grammar's own choice
        when the argmax breaks the call's JSON)."""
        best, top = pick
        if not math.isfinite(top):
            raise BadLogits(f"the model's logits are not finite numbers (the largest allowed is {top})")
        if r.grammar_state is not None and not self.grammar.allows(r.grammar_state, best):
            return self.sample(r.logits, r.opened, row, r.grammar_state)
        return best

    def _picks(self, logits: torch.Tensor, opened: list) -> list:
        """(argmax, max) over the allowed tokens of logits (n, T, vocab), where opened[i][t] is the
        opener in force at row i, position t: one read from the device for all of them."""
        idx = torch.tensor([[self.opened_index[o] for o in os_] for os_ in opened], device=logits.device)
        top, arg = logits.masked_fill(self.ban_mask[idx], -math.inf).max(-1)
        both = torch.stack([arg.to(top.dtype), top], -1).tolist()       # the one host sync
        return [[(int(a), t) for a, t in row] for row in both]

    def _greedy(self, r: Row) -> bool:
        return r.policy is None and self.temperature <= 0

    # ----------------------------------------------------------------- turns

    def begin_turn(self, row: int, logits: torch.Tensor, max_new: int, policy=None, on_token=None) -> None:
        """`row` decodes from `logits` until a stop token, max_new tokens, a full cache or logits it
        cannot sample from; step() advances it with the other decoding rows."""
        r = self.rows[row]
        r.logits, r.out, r.max_new, r.opened, r.grammar_state = logits, [], max_new, None, None
        r.policy, r.on_token, r.full, r.bad_logits, r.decoding = policy, on_token, False, None, True
        r.ahead = None

    def _finish(self, row: int) -> None:
        r = self.rows[row]
        r.decoding, r.logits = False, None
        r.stats["decode_tokens"] += len(r.out)
        if r.out and r.out[-1] in self.stop:
            r.pending = [r.out[-1]]

    def _forward_rows(self, tokens: list[list[int]], rows: list[int]) -> torch.Tensor:
        """Logits (n, T, vocab) of T new tokens for each of `rows`, appended to their cache rows:
        the compiled graph when there is one, else the model's own forward."""
        x = torch.tensor(tokens, device=self.device)
        if self.graphs is not None:
            try:
                return self.graphs(x, rows)
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly from now on
                self.graphs = None  # layers that ran wrote past the rows' lengths: rewritten below
                if "compile" not in _warned:
                    _warned.add("compile")
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    print(f"WARNING: the compiled decode step failed ({type(e).__name__}: {reason}); "
                          "decoding eagerly", flush=True)
        self.cache.bind(rows)
        return self.model.head(self.model.hidden(x, cache=self.cache)).float()

    @torch.no_grad()
    def step(self) -> list[int]:
        """One forward for every row in a turn: choose its next token from its logits, feed it (with
        the row's draft, if any), then keep the drafted tokens the model would have written.
        Returns the rows whose turn ended (their tokens are rows[i].out)."""
        t0 = time.perf_counter()
        decoding = [i for i, r in enumerate(self.rows) if r.decoding]
        fresh = [i for i in decoding if self.rows[i].ahead is None and self._greedy(self.rows[i])]
        picks = {}
        if fresh:
            logits = torch.stack([self.rows[i].logits for i in fresh])[:, None]
            picks = dict(zip(fresh, (p[0] for p in self._picks(logits, [[self.rows[i].opened] for i in fresh]))))
        done, go, feed, drafts = [], [], [], []
        for i in decoding:
            r = self.rows[i]
            nxt, r.ahead = (r.ahead, None) if r.ahead is not None else (self._next(i, picks.get(i)), None)
            if nxt is None or nxt in self.stop:
                done.append(i)
            elif len(r.ids) + 1 > self.max_len:
                r.full = True
                done.append(i)
            else:  # the last token of a turn goes into the cache too, as every sampled one does
                go.append(i)
                drafts.append(self._draft(r, nxt) if len(r.out) < r.max_new else [])
                feed.append([nxt] + drafts[-1])
        if go:
            T = max(map(len, feed))
            if T > 1:  # every row gets T tokens; the padding (its last token again) is rolled back
                T = 1 + self.draft if self.graphs is not None else T  # one compiled graph for drafting
                room = min(self.max_len - len(self.rows[i].ids) for i in go)
                T = min(T, room)
                feed = [(f + f[-1:] * T)[:T] for f in feed]
                drafts = [d[:T - 1] for d in drafts]
            logits = self._forward_rows(feed, go)
            for j, i in enumerate(go):
                if self._accept(i, feed[j], len(drafts[j]), logits[j]):
                    done.append(i)
        dt = time.perf_counter() - t0
        self.step_s += dt
        for i in set(go + done):
            self.rows[i].stats["decode_s"] += dt
        for i in done:
            self._finish(i)
        return done

    def _draft(self, r: Row, nxt: int) -> list[int]:
        """Up to `draft` tokens to verify after nxt: what followed the context's last n-gram
        earlier on, cut to the turn's budget and the cache's room."""
        if not self.draft:
            return []
        k = min(self.draft, r.max_new - len(r.out), self.max_len - len(r.ids) - 1)
        if k <= 0:
            return []
        return lookup_draft(r.ids + [nxt], r.grams, k)

    def _accept(self, i: int, fed: list[int], n_draft: int, logits: torch.Tensor) -> bool:
        """After a forward of fed = [token, n_draft drafts, padding] for row i (logits (T, vocab)):
        keep the token, then each draft the row's sampler picks from the logits before it; the
        first pick that differs is fed at the next step. The cache is rolled back to what was kept
        (entries past a row's length are never read). True when the turn is over."""
        r = self.rows[i]
        r.ids.append(fed[0])
        r.stats["forward_tokens"] += 1
        r.logits = logits[0]
        if self.record:
            self.logits.append((len(r.ids) - 1, logits[0][None]))
        over = len(r.out) >= r.max_new
        if n_draft and not over:
            r.stats["drafted"] += n_draft
            picks = None
            if self._greedy(r):  # every position's pick in one read, under the openers the drafts imply
                opened, o = [], r.opened
                for t in range(n_draft):
                    o = fed[t] if t and fed[t] in self.openers else o
                    opened.append(o)
                picks = self._picks(logits[None, :n_draft], [opened])[0]
            for t in range(n_draft):
                nxt = self._next(i, picks and picks[t])
                if nxt is None or nxt in self.stop:
                    over = True
                    break
                if nxt != fed[t + 1]:
                    r.ahead = nxt
                    break
                r.ids.append(nxt)
                r.stats["accepted"] += 1
                r.logits = logits[t + 1]
                if len(r.out) >= r.max_new:
                    over = True
                    break
        self.cache.lengths[i] = len(r.ids)
        return over

    def decode(self, logits: torch.Tensor, max_new: int, policy=None, on_token=None, row: int = 0) -> list[int]:
        """One row's turn on its own: sample (or take from `policy(logits)`) up to max_new tokens,
        stopping after a stop token; every token but the last is fed back through the cache."""
        if any(r.decoding for i, r in enumerate(self.rows) if i != row):
            raise RuntimeError("decode() runs one row alone; with other rows in a turn, use step()")
        self.begin_turn(row, logits, max_new, policy, on_token)
        if max_new < 1:
            self._finish(row)
        while self.rows[row].decoding:
            self.step()
        return self.rows[row].out
