"""Continuous batching: rows of static KV caches are slots that requests take and leave between decode steps.

Each row has a one-row cache of its own holding one sequence from slot 0 on, so a token's slot is its rotary
position; every row has its own length. A decode step runs the rows that run (padded up to 1, 2, 4 … rows): it
feeds each its last token, writes it at the row's length and attends over its filled slots
(`LlamaModel.decode_rows`: the row's cache read in place, masked; the caches are graph inputs, so one compiled
graph per number of rows serves any rows, all built by `warm_up`; lengths, positions and masks are tensors, so rows
joining and leaving compile nothing).

A request joins in pieces, one piece between two decode steps, so that the running rows keep streaming: its images
through the vision tower a few tiles at a time (or from the image-feature cache), then its prompt `prefill_piece`
tokens at a time into a one-row working cache of its own length bucket; its keys and values are then copied into
its row and it decodes with the others. Several requests may be joining at once (`max_joining`); each step's piece
goes to the one with the fewest pieces left, so a short request that arrives while a photo is being encoded does
not wait for that photo (shortest remaining work first; one passed over `MAX_PASSED` times in a row goes next).

A row that ended stays parked with its tokens: a request whose prompt begins the same way
(`prefix.reusable_prefix`: ids, images by their key) takes that row and prefills only the rest — a conversation's
next turn, or another question about the same picture.

Greedy rows take the argmax of the step's logits (computed in the graph); sampled rows draw from their own seeded
generator (`generation.Sampler`), so an answer does not depend on what else runs. Rows are objects with `inputs`
(the processor's output for a batch of one), `params` (SamplingParams), `add(token, finish_reason)`, `done` and
`fail(error)`, as in runner.py.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .errors import Idefics3Error
from .generation import CACHE_BUCKET, Sampler, cache_length
from .image_cache import ImageFeatureCache
from .prefix import image_spans, reusable_prefix
from .runtime import as_graph_inputs, jit_cell

PREFILL_PIECE = 256  # prompt tokens per prefill piece of a joining request
VISION_PIECE = 2  # image tiles per vision piece of a joining request
MAX_JOINING = 4  # requests joining at once (each holds a working cache of its prompt's length bucket)
MAX_PASSED = 8  # pieces a joining request lets others go before it runs whatever they have left


class RowsStep(nn.Cell):
    """One token per row, each row at its own length in its own cache (`LlamaModel.decode_rows`) → (argmax ids
    (B,) int32, fp32 logits (B, V))."""

    def __init__(self, model):
        super().__init__()
        self.lm = model

    def construct(self, token: Tensor, position: Tensor, row_slots: Tensor, key_keep: Tensor, *caches):
        text = self.lm.model.text_model
        hidden = text.decode_rows(text.embed_tokens(token), position, key_keep, row_slots, caches)
        logits = self.lm.logits(hidden)[:, -1]
        return ops.argmax(logits, -1).astype(ms.int32), logits


class Slot:
    """A row of the cache: the tokens whose keys and values it holds (slot i = token i), their images' spans, and
    the request running in it (None: parked, its tokens kept for a later prefix)."""

    def __init__(self, ids: np.ndarray, spans: list, row=None, sampler: Optional[Sampler] = None):
        self.ids, self.spans, self.row, self.sampler = ids, spans, row, sampler
        self.token = 0  # the last new token, fed at the next step (running rows)
        self.count = 0  # new tokens so far
        self.used = 0  # when it was last taken (the least recently used parked row is given away first)


class Join:
    """A request on its way into a row: the vision pieces, then the prefill pieces, then the copy into its row."""

    def __init__(self, batch: "ContinuousBatch", row, taken=()):
        model, cfg = batch.model, batch.model.config
        self.batch, self.row = batch, row
        inputs = row.inputs
        mask = inputs.get("attention_mask")
        if mask is not None and not np.asarray(mask).all():
            raise Idefics3Error("a continuous-batching row is one unpadded prompt (a batch of one)")
        self.ids = np.asarray(inputs["input_ids"])[0].astype(np.int64)
        n = len(self.ids)
        if n + row.params.max_new_tokens > batch.length:
            raise Idefics3Error(f"the prompt has {n} tokens; with max_new_tokens={row.params.max_new_tokens} that "
                                f"is beyond the {batch.length} slots of a row")
        self.images = batch.image_cache.images(model, inputs)
        tiles = [len(tiles) for _, tiles, _ in self.images]
        self.spans = image_spans(self.ids, cfg.image_token_id, cfg.image_seq_len, tiles,
                                 [key for key, _, _ in self.images])
        self.index, self.reused = batch.choose_row(self.ids, self.spans, taken)
        # the images after the reused prefix: their features, found in the cache or computed in pieces
        self.needed = [i for i, (start, _, _) in enumerate(self.spans) if start >= self.reused]
        self.features: Dict[int, Tensor] = {}
        for i in self.needed:  # now, so that pieces_left knows (and again before computing: another may store it)
            found = batch.image_cache.lookup(self.images[i][0], count_miss=False)
            if found is not None:
                self.features[i] = found
        self.partial: List[Tensor] = []
        self.vision_tiles = 0
        self.embeds: Optional[Tensor] = None
        self.next = self.reused  # the next prompt slot to prefill
        self.work = None  # its working cache, from the first prefill piece to the copy into its row
        self.logits: Optional[np.ndarray] = None
        self.passed = 0  # pieces run for other joining requests since its last one

    def pieces_left(self) -> int:
        """How many `advance` calls it still needs (images found in the cache later count as needing theirs)."""
        done = sum(part.shape[0] for part in self.partial)
        tiles = sum(len(self.images[i][1]) for i in self.needed if i not in self.features) - done
        prefill = -(-(len(self.ids) - self.next) // self.batch.prefill_piece)
        return -(-tiles // self.batch.vision_piece) + max(prefill, 1)

    def advance(self) -> bool:
        """One piece of work (a few tiles of vision, or one prefill piece); True when the request's prompt is in
        its row (`logits` then holds its last position's logits)."""
        if self._vision_piece():
            return False
        if self.embeds is None:
            features = [self.features[i] for i in self.needed]
            ids = self.ids[None, self.reused:].astype(np.int32)
            self.embeds, _ = self.batch.model.embed_prompt(
                ids, image_hidden_states=(ops.cat(features, axis=0) if len(features) > 1 else features[0])
                if features else None)
        self._prefill_piece()
        if self.next < len(self.ids):
            return False
        self.batch.caches[self.index].copy_row(0, self.work, 0, len(self.ids))
        self.release()
        return True

    def release(self) -> None:
        """Give its working cache back (done, failed or dropped)."""
        work, self.work = self.work, None
        if work is not None:
            self.batch.give_back(work)

    def _vision_piece(self) -> bool:
        """Run the next few tiles of the next image that needs them; False when every image has its features."""
        batch = self.batch
        for i in self.needed:
            if i in self.features:
                continue
            key, tiles, keep = self.images[i]
            if not self.partial:
                found = batch.image_cache.lookup(key)
                if found is not None:
                    self.features[i] = found
                    continue
            done = sum(part.shape[0] for part in self.partial)
            part = slice(done, min(done + batch.vision_piece, len(tiles)))
            self.partial.append(batch.model.get_image_features(tiles[None, part], keep[None, part], use_jit=True))
            self.vision_tiles += part.stop - part.start
            if part.stop == len(tiles):
                features = ops.cat(self.partial, axis=0) if len(self.partial) > 1 else self.partial[0]
                batch.image_cache.store(key, features)
                self.features[i], self.partial = features, []
            return True
        return False

    def _prefill_piece(self) -> None:
        """The next `prefill_piece` prompt tokens into the working cache (the last piece right-padded: slots after
        the prompt, overwritten by the answer before it reads them)."""
        batch, text = self.batch, self.batch.model.model.text_model
        piece, n, start = batch.prefill_piece, len(self.ids), self.next
        if start == self.reused:  # the first piece: a working cache for all of them, with the reused prefix
            self.work = batch.working_cache(self.reused + -(-(n - self.reused) // piece) * piece)
            if self.reused:
                self.work.copy_row(0, batch.caches[self.index], 0, self.reused)
        work = self.work
        h = self.embeds[:, start - self.reused:min(start + piece, n) - self.reused]
        if h.shape[1] < piece:
            h = ops.cat((h, ops.zeros((1, piece - h.shape[1], h.shape[-1]), h.dtype)), axis=1)
        slots = np.arange(start, start + piece, dtype=np.int32)
        keep = Tensor(np.ones((1, work.shape[1]), np.bool_))
        text.use_caches(work)
        hidden = text.extend(h, Tensor(slots[None]), keep, Tensor(slots))
        self.next = min(start + piece, n)
        if self.next == n:
            last = n - 1 - start
            self.logits = batch.model.logits(hidden[:, last:last + 1])[:, -1].asnumpy()


class ContinuousBatch:
    """`rows` slots of `length` tokens each, and up to `max_joining` requests joining at a time (see the module)."""

    def __init__(self, model, rows: int, length: int, stop_ids, *, image_cache: Optional[ImageFeatureCache] = None,
                 prefill_piece: int = PREFILL_PIECE, vision_piece: int = VISION_PIECE,
                 max_joining: int = MAX_JOINING, log: Optional[logging.Logger] = None):
        if length != cache_length(length):
            raise Idefics3Error(f"a row's length must be {CACHE_BUCKET} × a power of two, got {length}")
        self.model, self.rows, self.length = model, rows, length
        self.stop = np.asarray(stop_ids, np.int64)
        self.image_cache = image_cache if image_cache is not None else ImageFeatureCache(0)
        self.prefill_piece = min(prefill_piece, length // 2)
        self.vision_piece = vision_piece
        self.max_joining = max(1, min(max_joining, rows))
        self.log = log
        text = model.model.text_model
        # a cache of its own for each row: a step reads and writes only the rows that run (MindSpore's CPU
        # scatter copies the whole tensor it writes into; a copy of a few rows out of one cache cost more still)
        self.caches = [text.new_caches(1, length) for _ in range(rows)]
        self.slots: List[Optional[Slot]] = [None] * rows  # None: never used
        self.joins: List[Join] = []  # the requests joining, oldest first
        self.reused_tokens = 0  # prompt tokens taken from parked rows, in all
        self._spare: List = []  # working caches not in use, kept for the next joins (at most max_joining)
        self._steps: Dict[int, object] = {}  # compiled decode step by number of rows (`step_sizes`)
        self._clock = 0

    # ------------------------------------------------------------------------------------------- state
    @property
    def running(self) -> List[Slot]:
        return [slot for slot in self.slots if slot is not None and slot.row is not None]

    def idle(self) -> bool:
        """Nothing joining, nothing running."""
        return not self.joins and not self.running

    def has_room(self) -> bool:
        """Whether a request can start joining now: fewer than max_joining are, and a row is neither running nor
        taken by one joining."""
        taken = {join.index for join in self.joins}
        return len(self.joins) < self.max_joining and any(
            (slot is None or slot.row is None) and i not in taken for i, slot in enumerate(self.slots))

    def step_sizes(self) -> List[int]:
        """Every number of rows a decode step runs (the running rows, padded up to the next of these)."""
        out, n = [], 1
        while n < self.rows:
            out.append(n)
            n *= 2
        return out + [self.rows]

    def choose_row(self, ids: np.ndarray, spans: list, taken=()):
        """(row index, tokens reused): the parked row that gives the longest prefix, when that is at least half of
        what the row holds (as llama.cpp's slot similarity: a short shared start, a system prompt's first tokens,
        must not cost a conversation its cached turns); else a row never used, else the least recently used
        parked one (with whatever prefix it gives). Rows in `taken` (other joining requests') are not chosen."""
        parked = [i for i, slot in enumerate(self.slots) if slot is not None and slot.row is None and i not in taken]
        reuse = {i: reusable_prefix(self.slots[i].ids, self.slots[i].spans, ids, spans) for i in parked}
        best = max((i for i in parked if 2 * reuse[i] >= len(self.slots[i].ids) and reuse[i]),
                   key=lambda i: reuse[i], default=None)
        if best is None:
            free = [i for i, slot in enumerate(self.slots) if slot is None and i not in taken]
            if free:
                return free[0], 0
            if not parked:
                raise Idefics3Error("no row is free")
            best = min(parked, key=lambda i: self.slots[i].used)
        return best, reuse[best]

    def working_cache(self, slots: int):
        """A one-row working cache for a prompt of `slots` slots (its length bucket): a spare one of that length,
        else a new one (the compiled prefill takes the caches as inputs, so a new one compiles nothing)."""
        length = cache_length(slots)
        for i, work in enumerate(self._spare):
            if work.shape[1] == length:
                return self._spare.pop(i)
        self._trim(1)  # the old ones go before the new one is made
        return self.model.model.text_model.new_caches(1, length)

    def give_back(self, work) -> None:
        """A working cache a join no longer needs: kept as a spare."""
        self._spare.append(work)
        self._trim(0)

    def _trim(self, making: int) -> None:
        """Working caches in use, spare and about to be made stay within max_joining (the oldest spares go)."""
        in_use = sum(join.work is not None for join in self.joins)
        while self._spare and len(self._spare) + in_use + making > self.max_joining:
            self._spare.pop(0)

    # ------------------------------------------------------------------------------------------- work
    def join(self, row) -> None:
        """Start `row` on its way in (has_room() must be True); a request that cannot run fails at once."""
        try:
            join = Join(self, row, {j.index for j in self.joins})
        except Exception as e:  # noqa: BLE001 - the request's failure, not the batch's
            self._fail(row, e)
            return
        slot = self.slots[join.index]
        if slot is not None:  # its row is taken: the parked tokens go (the prefix reused stays)
            slot.ids, slot.spans = slot.ids[:join.reused], []
        self.joins.append(join)

    def next_join(self) -> Optional[Join]:
        """The joining request that gets the next piece: the one with the fewest pieces left (the oldest among
        equals), unless one has been passed over MAX_PASSED times in a row."""
        if not self.joins:
            return None
        starved = [j for j in self.joins if j.passed >= MAX_PASSED]
        return starved[0] if starved else min(self.joins, key=Join.pieces_left)

    def advance(self) -> None:
        """One piece of a joining request (`next_join`); when its prompt is in, it becomes a running row with its
        first token. A joining row that is `done` (its owner gave it up) is dropped."""
        for gone in [j for j in self.joins if j.row.done]:  # their clients went away while they joined
            self._drop(gone)
        join = self.next_join()
        if join is None:
            return
        for other in self.joins:
            other.passed = 0 if other is join else other.passed + 1
        try:
            if not join.advance():
                return
        except Exception as e:  # noqa: BLE001
            self._drop(join)
            self._fail(join.row, e)
            return
        self.joins.remove(join)
        self.reused_tokens += join.reused
        self._clock += 1
        slot = Slot(join.ids, join.spans, join.row, Sampler(join.row.params, 1))
        slot.used = self._clock
        self.slots[join.index] = slot
        self._emit(slot, self._pick(slot, join.logits, None))

    def step(self) -> None:
        """One decode step of every running row."""
        running = [i for i, slot in enumerate(self.slots) if slot is not None and slot.row is not None]
        if not running:
            return
        size = next(n for n in self.step_sizes() if n >= len(running))
        order = running + running[:1] * (size - len(running))  # padding: the first row again, with the same inputs
        lengths = np.array([len(self.slots[i].ids) for i in order], np.int32)
        keep = np.arange(self.length)[None] < lengths[:, None]  # the rows' tokens; a new key comes from the step
        tokens = np.array([[self.slots[i].token] for i in order], np.int32)
        caches = as_graph_inputs([t for n in range(len(self.model.model.text_model.layers)) for i in order
                                  for t in (self.caches[i].layers[n].k, self.caches[i].layers[n].v)])
        try:
            ids, logits = self._step(size)(Tensor(tokens), Tensor(lengths[:, None]), Tensor(lengths), Tensor(keep),
                                           *caches)
            ids = ids.asnumpy()
            greedy = all(self.slots[i].sampler.greedy for i in running)
            logits_np = None if greedy else logits.asnumpy()
        except Exception as e:  # noqa: BLE001 - the running rows' failure; the batch goes on with the next rows
            for i in running:
                self._fail(self.slots[i].row, e)
                self.slots[i] = None  # what its cache row holds is unknown now: never a prefix
            return
        for j, i in enumerate(running):
            slot = self.slots[i]
            slot.ids = np.append(slot.ids, slot.token)
            self._emit(slot, self._pick(slot, None if logits_np is None else logits_np[j:j + 1], int(ids[j])))

    def _step(self, size: int):
        if size not in self._steps:
            self._steps[size] = jit_cell(RowsStep(self.model))
        return self._steps[size]

    def _pick(self, slot: Slot, logits: Optional[np.ndarray], argmax: Optional[int]) -> int:
        if slot.sampler.greedy and argmax is not None:
            return argmax
        return int(slot.sampler(logits, slot.ids[None])[0])

    def _emit(self, slot: Slot, token: int) -> None:
        """Give the row its new token (with why it ends, if it does); a row that ends is parked."""
        row = slot.row
        slot.count += 1
        stopped = bool(np.isin(token, self.stop))
        out_of_room = not stopped and slot.count >= row.params.max_new_tokens
        try:
            row.add(token, "stop" if stopped else "length" if out_of_room else None)
        except Exception as e:  # noqa: BLE001
            self._fail(row, e)
        if row.done or stopped or out_of_room:
            slot.row = slot.sampler = None  # parked: its tokens (the last one never fed) stay for a later prefix
        else:
            slot.token = token

    def _drop(self, join: Join) -> None:
        """A joining request that will not run. Its row keeps the prefix it reused (a join writes into its row
        only at its end, and then the same keys for those slots)."""
        self.joins.remove(join)
        join.release()

    def _fail(self, row, error: Exception) -> None:
        if self.log is not None:
            self.log.error("request failed: %s: %s", type(error).__name__, error, exc_info=error)
        if not row.done:
            row.fail(error)

    # ------------------------------------------------------------------------------------------- warm-up
    def warm_up_plan(self, vision: bool = True) -> List[tuple]:
        """What rows joining and leaving compile, as (kind, size) items for `warm_up_one`: the decode step,
        the prefill piece per working-cache length, a vision piece per tile count."""
        plan = [("decode", n) for n in self.step_sizes()]
        length = cache_length(self.prefill_piece)
        while length <= cache_length(self.length + self.prefill_piece):  # a last piece's padding may run past a row
            plan.append(("prefill", length))
            length *= 2
        if vision:  # full tiles, and tiles with padding (a masked graph)
            plan += [(kind, n) for kind in ("vision", "vision padded") for n in range(1, self.vision_piece + 1)]
        return plan

    def warm_up(self, vision: bool = True) -> None:
        for kind, n in self.warm_up_plan(vision):
            self.warm_up_one(kind, n)

    def warm_up_one(self, kind: str, n: int) -> None:
        text = self.model.model.text_model
        if kind == "decode":  # n rows: row 0, written at its last slot, which no row ever reads (a request's last
            zeros = np.zeros((n, 1), np.int32)  # token is never fed: `Join` keeps prompt + answer within the row)
            last = np.full(n, self.length - 1, np.int32)
            caches = as_graph_inputs([t for layer in self.caches[0].layers for _ in range(n)
                                      for t in (layer.k, layer.v)])
            self._step(n)(Tensor(zeros), Tensor(last[:, None]), Tensor(last), Tensor(np.zeros((n, self.length),
                                                                                            np.bool_)), *caches)
        elif kind == "prefill":
            piece, hidden = self.prefill_piece, self.model.config.text_config.hidden_size
            work = self.working_cache(n)
            slots = np.arange(piece, dtype=np.int32)
            text.use_caches(work)
            text.extend(ops.zeros((1, piece, hidden), self.model.dtype), Tensor(slots[None]),
                        Tensor(np.ones((1, n), np.bool_)), Tensor(slots))
            self.give_back(work)
        elif kind in ("vision", "vision padded"):
            size = self.model.config.vision_config.image_size
            mask = np.ones((1, n, size, size), np.int64)
            if kind == "vision padded":
                mask[..., size // 2:] = 0
            self.model.get_image_features(np.full((1, n, 3, size, size), 0.5, np.float32),  # (all-zero = padding)
                                          mask, use_jit=True)
        else:
            raise ValueError(f"unknown warm-up item {kind!r}")
