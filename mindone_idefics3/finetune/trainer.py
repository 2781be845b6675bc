"""The training loop: seeded data order, gradient accumulation, data parallel workers, AdamW, logs, checkpoints.

Step k of a run with W workers, per-worker batch b and A accumulation steps takes the examples at positions
k·G … (k+1)·G − 1 of the seeded order (G = A·W·b; each epoch is a new permutation seeded by seed + epoch); micro
step a of rank r takes the b positions from k·G + (a·W + r)·b. Every micro batch contributes the *sum* of its
token losses and their gradients; the sums of all micro steps and ranks are added up (AllReduce under msrun) and
divided by the number of labelled tokens of the whole step, so any split of the same examples over workers and
micro batches gives the same update (up to float summation order).

Gradients come from `mindspore.value_and_grad` over the model's PyNative forward (`model(..., labels=...)`): the
forward prepares its inputs on the host (image tiles, masks, positions) and its shapes change with every batch,
so the whole step cannot be one compiled graph. Compiling the decoder layer alone (`jit_cell(layer_math)`, the
prefill's graph, with the weights as inputs) made the step faster, but MindSpore 2.10 returned the layer
weights' gradients shifted by the graph's None inputs (the absent KV cache and biases): wrong gradients, so it is
not used. AdamW's update is compiled per parameter (optim.py).

Checkpoints (`OUT/checkpoint/`): the trainable weights, AdamW's moments and step, and the trainer state (step,
examples skipped) — written to a temporary folder and renamed, so a checkpoint is whole or absent. `resume`
restores them; the data position and the dropout seed are functions of the step, so a resumed run logs the same
losses as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops

from ..distributed import World
from ..errors import Idefics3Error
from ..files import atomic_directory, write_text_atomically
from .data import Labeler, TrainingData, collate_examples, scored_tokens
from .optim import AdamW, clip_coefficient, grad_norm, lr_factor

CHECKPOINT = "checkpoint"
TRAIN_LOG = "train_log.jsonl"
TRAIN_VISION_CHUNK = 64


@dataclass
class TrainConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    batch_size: int = 1
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    seed: int = 0
    max_length: Optional[int] = None
    skip_long: bool = False
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = None


def padding_rows(model, params: Sequence[Parameter]) -> Dict[int, int]:
    """{position in params: row} for the token embedding's pad row: transformers builds Llama's embedding with
    padding_idx = pad_token_id, whose gradient torch keeps at zero (full fine-tuning only)."""
    pad = model.config.text_config.pad_token_id
    embed = model.model.text_model.embed_tokens.weight
    if pad is None:
        return {}
    return {i: int(pad) for i, p in enumerate(params) if p is embed}


class Trainer:
    def __init__(self, model, processor, data: TrainingData, params: Sequence[Parameter], config: TrainConfig,
                 out_dir: Path, world: World = World(), train_on: str = "assistant",
                 eval_data: Optional[TrainingData] = None, progress: bool = True,
                 on_save: Optional[Callable[[], None]] = None):
        self.model, self.processor, self.data, self.cfg = model, processor, data, config
        self.params = list(params)
        self.out, self.world, self.eval_data = Path(out_dir), world, eval_data
        self.labeler = Labeler(processor, train_on)
        self.pad_id = processor.tokenizer.pad_token_id
        self.per_step = config.grad_accum * world.size * config.batch_size
        if config.max_steps is not None:
            self.total_steps, self.total_examples = config.max_steps, None
        else:
            epochs = config.epochs if config.epochs is not None else 1.0
            self.total_examples = int(round(epochs * len(data)))
            self.total_steps = max(1, -(-self.total_examples // self.per_step))
        self.optimizer = AdamW(self.params, config.learning_rate, config.betas, config.eps, config.weight_decay)
        self.grad_fn = ms.value_and_grad(self._loss_sum, None, self.params)
        self.step, self.skipped, self.progress, self.on_save = 0, 0, progress, on_save
        self.pad_rows = padding_rows(model, self.params)
        self._orders: Dict[int, np.ndarray] = {}
        # A trained vision tower keeps every tile's activations for the backward pass anyway: one vision call for
        # all tiles of a batch. A frozen one runs compiled without a backward pass (model/idefics3.py): the
        # inference default of tiles per call bounds its memory.
        if model.model.vision_model.trainable_params():
            model.model.vision_chunk = TRAIN_VISION_CHUNK

    # ------------------------------------------------------------------------------------------- data
    def position(self, p: int) -> Optional[int]:
        """The example index at position p of the seeded order (None past the end of --epochs)."""
        if self.total_examples is not None and p >= self.total_examples:
            return None
        epoch, i = divmod(p, len(self.data))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.data))}
        return int(self._orders[epoch][i])

    def micro_batches(self, step: int, rank: int) -> List[List[int]]:
        cfg, w = self.cfg, self.world.size
        out = []
        for a in range(cfg.grad_accum):
            first = step * self.per_step + (a * w + rank) * cfg.batch_size
            out.append([i for i in (self.position(first + j) for j in range(cfg.batch_size)) if i is not None])
        return out

    def samples(self, indices: Sequence[int], data: TrainingData) -> List[dict]:
        out = []
        for i in indices:
            example = data[i]
            sample = self.labeler(example)
            n = sample["input_ids"].shape[1]
            if self.cfg.max_length is not None and n > self.cfg.max_length:
                if not self.cfg.skip_long:
                    raise Idefics3Error(f"{data.path} line {example.line}: the example is {n} tokens long, more "
                                        f"than --max-length {self.cfg.max_length}; raise --max-length, shorten it "
                                        "(fewer/smaller images: --longest-edge, --no-image-splitting) or pass "
                                        "--skip-long")
                self.skipped += data is self.data
                continue
            out.append(sample)
        return out

    # ------------------------------------------------------------------------------------------- math
    def _loss_sum(self, batch):
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                          batch.get("pixel_attention_mask"), labels=batch["labels"], num_items_in_batch=1.0).loss

    def local_sums(self) -> Tuple[List[Tensor], Tensor]:
        """This rank's part of the current step: the summed fp32 gradients of its micro batches' summed token
        losses, and (loss sum, labelled tokens, tokens) — what train_step adds up over the ranks."""
        grads = None  # the first micro batch's gradients, then sums (no zero-filled copy of every weight)
        loss_sum = count = tokens = 0.0
        for indices in self.micro_batches(self.step, self.world.rank):
            samples = self.samples(indices, self.data)
            if not samples:
                continue
            batch = collate_examples(samples, self.pad_id)
            n = scored_tokens(batch["labels"])
            if n == 0:
                continue
            loss, g = self.grad_fn(batch)
            g = [x if x.dtype == ms.float32 else x.astype(ms.float32) for x in g]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            loss_sum += float(loss.asnumpy())
            count += n
            tokens += float(batch["attention_mask"].sum())
        if grads is None:  # this rank had nothing to learn from: it still takes part in the AllReduce
            grads = [ops.zeros(p.shape, ms.float32) for p in self.params]
        return grads, Tensor(np.array([loss_sum, count, tokens], np.float64).astype(np.float32))

    def train_step(self) -> dict:
        """One optimiser step (all micro batches of this rank, all-reduced). Returns its log record."""
        t0 = time.perf_counter()
        ms.set_seed(self.cfg.seed * 1_000_003 + self.step)  # dropout masks: a function of the step (resume)
        grads, totals = self.local_sums()
        reduced = self.world.all_reduce(grads + [totals])
        grads, totals = reduced[:-1], reduced[-1].asnumpy()
        loss_sum, count, tokens = float(totals[0]), float(totals[1]), float(totals[2])
        if count == 0:
            raise Idefics3Error(f"step {self.step + 1}: no example of the step has a token to learn (all skipped "
                                "as too long?); check --max-length and the data")
        for i, row in self.pad_rows.items():  # transformers' Embedding(padding_idx=pad): that row is never trained
            grads[i][row] = 0
        # 1/count and the clipping coefficient go into the update as one factor: no scaled copies of the gradients
        norm = grad_norm(grads) / count
        coef = clip_coefficient(norm, self.cfg.max_grad_norm)
        lr = self.cfg.learning_rate * lr_factor(self.cfg.lr_scheduler, self.step, self.cfg.warmup_steps,
                                                self.total_steps)
        self.optimizer.step(grads, lr, grad_scale=coef / count)
        del grads
        self.step += 1
        return {"step": self.step, "loss": loss_sum / count, "lr": lr, "tokens": int(tokens),
                "seconds": round(time.perf_counter() - t0, 4), "grad_norm": norm}

    def evaluate(self) -> float:
        """Mean token loss over the eval data (each rank its share, all-reduced)."""
        data, b, w = self.eval_data, self.cfg.batch_size, self.world.size
        loss_sum = count = 0.0
        mine = list(range(self.world.rank, len(data), w))
        for start in range(0, len(mine), b):
            samples = self.samples(mine[start:start + b], data)
            if not samples:
                continue
            batch = collate_examples(samples, self.pad_id)
            loss_sum += float(self._loss_sum(batch).asnumpy())
            count += scored_tokens(batch["labels"])
        totals = self.world.all_reduce([Tensor(np.array([loss_sum, count], np.float32))])[0].asnumpy()
        return float(totals[0] / max(totals[1], 1))

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> List[dict]:
        from tqdm.auto import tqdm

        cfg, records = self.cfg, []
        rank0 = self.world.rank == 0
        bar = tqdm(total=self.total_steps, initial=self.step, desc="fine-tuning", unit="step",
                   disable=None if (self.progress and rank0) else True)
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                records.append(record)
                log = {k: record[k] for k in ("step", "loss", "lr", "tokens", "seconds")}
                if self.skipped:
                    log["skipped_total"] = self.skipped
                self.log(log)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens'] / max(record['seconds'], 1e-9):.0f}")
                if self.eval_data is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                    self.log({"step": self.step, "eval_loss": self.evaluate()})
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.eval_data is not None and not (cfg.eval_steps and self.step % cfg.eval_steps == 0):
            self.log({"step": self.step, "eval_loss": self.evaluate()})
        self.save_checkpoint()
        return records

    def log(self, record: dict) -> None:
        if self.world.rank != 0:
            return
        with open(self.out / TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """OUT/checkpoint/ (weights, optimiser, state) written whole or not at all; then `on_save` (the adapter or
        model files). Rank 0 only."""
        if self.world.rank != 0:
            return
        from safetensors.numpy import save_file

        with atomic_directory(self.out / CHECKPOINT) as tmp:
            save_file({f"param.{i}": p.asnumpy() for i, p in enumerate(self.params)},
                      str(tmp / "trainable.safetensors"))
            save_file(self.optimizer.state(), str(tmp / "optimizer.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "skipped": self.skipped,
                                                                "params": [list(p.shape) for p in self.params]}))
        if self.on_save is not None:
            self.on_save()

    def load_checkpoint(self) -> None:
        from safetensors.numpy import load_file

        where = self.out / CHECKPOINT
        if not (where / "trainer_state.json").is_file():
            raise Idefics3Error(f"--resume: {where} holds no checkpoint (none was saved yet: use --save-steps); "
                                "start again with --overwrite")
        state = json.loads((where / "trainer_state.json").read_text())
        if state["params"] != [list(p.shape) for p in self.params]:
            raise Idefics3Error(f"--resume: the checkpoint in {where} was trained with other trainable weights "
                                "(another --lora-* / --full setting or model); resume with the same options")
        weights = load_file(str(where / "trainable.safetensors"))
        for i, p in enumerate(self.params):
            p.set_data(Tensor(weights[f"param.{i}"], p.dtype))
        self.optimizer.load_state(load_file(str(where / "optimizer.safetensors")))
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        log = self.out / TRAIN_LOG
        if self.world.rank == 0 and log.is_file():  # drop lines logged after the checkpoint
            kept = [line for line in log.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            write_text_atomically(log, "".join(line + "\n" for line in kept))
