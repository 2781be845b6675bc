"""`finetune.py` / `idefics3-finetune` / `python -m mindone_idefics3.finetune`: LoRA or full fine-tuning."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from ..cli_options import load_processor_and_model, run_command
from ..distributed import World, current_world, is_msrun_scheduler, share_cpu_threads
from ..errors import Idefics3Error
from ..files import atomic_path, read_json, write_json_atomically
from ..process import peak_rss_bytes

EPILOG = """\
data: JSONL, one example per line in TRL's conversational format:
  {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
   "images": ["cat.jpg"]}
  images: paths (relative to the JSONL file), http(s) URLs or data: URIs, one per {"type": "image"} item.
  The loss is on the assistant turns (their content and closing <end_of_utterance>) unless --train-on all.

outputs (OUT): LoRA → adapter_config.json + adapter_model.safetensors (PEFT's format: peft.PeftModel loads
  them; so does generate.py --adapter OUT); --merge also writes OUT/merged, a full Hugging Face checkpoint.
  --full → the full checkpoint in OUT itself. Always: train_log.jsonl (one line per optimiser step:
  step, loss, lr, tokens, seconds; eval_loss lines with --eval-data), checkpoint/ (for --resume), and
  loss.png when matplotlib is installed (the `plot` extra).

data parallel: msrun --worker_num N --local_worker_num N --join True finetune.py ... (the global batch is
  N × --batch-size × --grad-accum; rank 0 writes OUT).

The train step runs in MindSpore's PyNative mode (each batch has its own shapes and host-side image layout).
exit codes: 0 done; 2 bad input or options (one line on stderr, nothing written); 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    from .names import DEFAULT_TARGETS, TARGET_HELP

    p = argparse.ArgumentParser(prog="finetune.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Fine-tune an Idefics3 / SmolVLM checkpoint on conversations with "
                                            "images: LoRA (default) or full, MindSpore on Ascend or CPU.",
                                epilog=EPILOG)
    p.add_argument("--model", required=True, help="base model directory or Hugging Face repo id")
    p.add_argument("--data", required=True, metavar="JSONL", help="training examples (see below)")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="output directory (must not exist, or be "
                   "empty, unless --resume or --overwrite)")
    p.add_argument("--eval-data", metavar="JSONL", help="examples to evaluate the loss on")
    p.add_argument("--eval-steps", type=int, default=None, metavar="N",
                   help="evaluate every N optimiser steps (default: only at the end) when --eval-data is given")
    p.add_argument("--train-on", choices=["assistant", "all"], default="assistant",
                   help="which tokens carry the loss: the assistant turns (default) or every non-image token")
    p.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help="longest example in tokens (images included); a longer one stops the run naming its "
                        "line, unless --skip-long (default: no limit)")
    p.add_argument("--skip-long", action="store_true", help="skip examples longer than --max-length (counted in "
                   "train_log.jsonl as skipped_total)")
    g = p.add_argument_group("LoRA (default) / full fine-tuning")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the delta is scaled by alpha / r "
                   "(default 16)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    g.add_argument("--lora-targets", default=DEFAULT_TARGETS, help=f"{TARGET_HELP} (default: {DEFAULT_TARGETS})")
    g.add_argument("--full", action="store_true", help="train all weights of the connector and the text model "
                   "(and the vision tower with --train-vision) instead of LoRA")
    g.add_argument("--train-vision", action="store_true", help="with --full: also train the vision tower")
    g.add_argument("--merge", action="store_true", help="LoRA: also write OUT/merged, the base with the adapter "
                   "merged in (a full Hugging Face checkpoint)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--learning-rate", "--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (default 0)")
    o.add_argument("--adam-beta1", type=float, default=0.9)
    o.add_argument("--adam-beta2", type=float, default=0.999)
    o.add_argument("--adam-epsilon", type=float, default=1e-8)
    o.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant"], default="linear",
                   help="transformers' schedules, after --warmup-steps of linear warmup (default linear)")
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    o.add_argument("--batch-size", type=int, default=1, help="examples per micro batch per worker (default 1)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimiser step (default 1)")
    o.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    o.add_argument("--epochs", type=float, default=None, help="passes over --data (default 1)")
    o.add_argument("--seed", type=int, default=0, help="data order, LoRA init and dropout (default 0)")
    o.add_argument("--recompute", action="store_true",
                   help="recompute each decoder layer's (and a trained vision tower's layers') activations in the "
                        "backward pass (less memory, slower)")
    r = p.add_argument_group("checkpoints")
    r.add_argument("--save-steps", type=int, default=None, metavar="N",
                   help="write OUT/checkpoint (and the adapter / model files) every N steps; always at the end")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with the same options")
    r.add_argument("--overwrite", action="store_true", help="delete what OUT holds and start afresh")
    m = p.add_argument_group("model and device")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="dtype of the frozen base weights (default fp32); LoRA weights and their math stay fp32; "
                        "--full needs fp32")
    m.add_argument("--device", choices=["Ascend", "CPU"], default=None, help="default: Ascend when usable")
    m.add_argument("--longest-edge", type=int, default=None, metavar="PIXELS",
                   help="resize images so their longest edge is this many pixels before splitting")
    m.add_argument("--no-image-splitting", action="store_true", help="one tile per image")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    if is_msrun_scheduler():  # serve communication.init(), nothing else
        from mindspore.communication import init

        init()
        return 0
    return run_command(run, args)


def check_args(args) -> None:
    positive = {"--batch-size": args.batch_size, "--grad-accum": args.grad_accum, "--lora-rank": args.lora_rank}
    for flag in ("max_steps", "eval_steps", "save_steps", "max_length"):
        value = getattr(args, flag)
        if value is not None:
            positive["--" + flag.replace("_", "-")] = value
    for flag, value in positive.items():
        if value < 1:
            raise Idefics3Error(f"{flag} must be at least 1, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        raise Idefics3Error(f"--epochs must be positive, got {args.epochs}")
    if args.learning_rate <= 0:
        raise Idefics3Error(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.warmup_steps < 0 or args.weight_decay < 0 or args.max_grad_norm < 0:
        raise Idefics3Error("--warmup-steps, --weight-decay and --max-grad-norm cannot be negative")
    if not 0 <= args.lora_dropout < 1:
        raise Idefics3Error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.skip_long and args.max_length is None:
        raise Idefics3Error("--skip-long needs --max-length")
    if args.train_vision and not args.full:
        raise Idefics3Error("--train-vision goes with --full (for LoRA on the vision tower use --lora-targets "
                            "vision.q_proj,...)")
    if args.merge and args.full:
        raise Idefics3Error("--merge is for LoRA; --full already writes the whole model to OUT")
    if args.full and args.dtype != "fp32":
        raise Idefics3Error("--full trains in fp32 (fp32 master weights for fp16/bf16 are not implemented); drop "
                            "--dtype or use LoRA")
    if args.resume and args.overwrite:
        raise Idefics3Error("--resume and --overwrite contradict each other; pick one")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise Idefics3Error(f"--output {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise Idefics3Error(f"--output {out} already exists and is not empty; pass --resume to continue its run, "
                            "--overwrite to start afresh, or another directory")
    if args.resume and not (out / "checkpoint" / "trainer_state.json").is_file():
        raise Idefics3Error(f"--resume: {out}/checkpoint holds no checkpoint to resume from")


def run(args) -> int:
    check_args(args)
    from .data import TrainingData

    data = TrainingData.open(args.data)
    eval_data = TrainingData.open(args.eval_data, "--eval-data") if args.eval_data else None
    if args.eval_steps and eval_data is None:
        raise Idefics3Error("--eval-steps needs --eval-data")

    from .trainer import TrainConfig, Trainer

    world = init_world()
    processor, model, _, _ = load_processor_and_model(args, progress=not args.no_progress and world.rank == 0)
    model_dir = Path(model.model_dir)
    lora = None
    for p in model.get_parameters():
        p.requires_grad = False
    if args.full:
        params = trainable_full(model, args.train_vision)
    else:
        from .lora import attach_lora, select_targets

        lora = attach_lora(model, select_targets(model, args.lora_targets), args.lora_rank, args.lora_alpha,
                           args.lora_dropout, seed=args.seed)
        params = lora.parameters()
    for p in params:
        p.requires_grad = True
    if args.recompute:
        model.model.text_model.recompute_layers = True
        # the vision tower's layers too when it trains (a frozen tower runs without a backward pass)
        model.model.vision_model.recompute_layers = bool(model.model.vision_model.trainable_params())
    model.set_train(True)
    config = TrainConfig(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, grad_accum=args.grad_accum, batch_size=args.batch_size,
        max_steps=args.max_steps, epochs=args.epochs if args.epochs is not None else (None if args.max_steps else 1.0),
        seed=args.seed, max_length=args.max_length, skip_long=args.skip_long, eval_steps=args.eval_steps,
        save_steps=args.save_steps)

    out = Path(args.output)

    def on_save():
        if lora is not None:
            from .lora import save_adapter

            save_adapter(out, lora, model, args.model)
        else:
            from .export import write_hf_files_into

            write_hf_files_into(model, model_dir, out)

    trainer = Trainer(model, processor, data, params, config, out, world, args.train_on, eval_data,
                      progress=not args.no_progress, on_save=on_save)
    settings = run_settings(args, world)
    if world.rank == 0:
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            saved = read_json(out / "run_settings.json", missing_ok=True)
            if saved and saved != settings:
                changed = sorted(k for k in settings if saved.get(k) != settings[k])
                raise Idefics3Error(f"--resume with other options than the run in {out} ({', '.join(changed)}); "
                                    "resume with the same options, or --overwrite")
        else:
            write_json_atomically(out / "run_settings.json", settings)

    if args.resume:
        trainer.load_checkpoint()
    records = trainer.train()
    if world.rank != 0:
        return 0
    if lora is not None and args.merge:
        from ..model.lora import merge
        from .export import write_hf_checkpoint

        merge(model)
        write_hf_checkpoint(model, model_dir, out / "merged")
    plot_losses(out)
    if records:
        print(f"done: {trainer.step} steps, last loss {records[-1]['loss']:.4f}, {trainer.skipped} examples "
              f"skipped, peak host memory {peak_rss_bytes() / 2**20:.0f} MB → {out}", file=sys.stderr)
    return 0


def trainable_full(model, train_vision: bool):
    """--full: the connector and the text model (embeddings, layers, norm, lm_head), and the vision tower with
    --train-vision."""
    keep = ("model.connector.", "model.text_model.", "lm_head.") + (("model.vision_model.",) if train_vision else ())
    return [p for name, p in model.parameters_and_names() if name.startswith(keep) and "kv_cache" not in name]


def run_settings(args, world) -> dict:
    """What a resumed run must share with the run it continues."""
    keys = ("model", "data", "train_on", "max_length", "skip_long", "lora_rank", "lora_alpha", "lora_dropout",
            "lora_targets", "full", "train_vision", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
            "adam_epsilon", "lr_scheduler", "warmup_steps", "max_grad_norm", "batch_size", "grad_accum",
            "max_steps", "epochs", "seed", "dtype", "longest_edge", "no_image_splitting")
    return {**{k: getattr(args, k) for k in keys}, "workers": world.size}


def init_world() -> World:
    """msrun's workers (RANK_SIZE > 1): MindSpore's communication, each rank a share of the CPU cores."""
    world = current_world()
    if world.size == 1:
        return world
    share_cpu_threads(world)
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return World(get_rank(), get_group_size())


def plot_losses(out: Path) -> None:
    """OUT/loss.png from train_log.jsonl when matplotlib is installed (the `plot` extra); silently skipped else."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
