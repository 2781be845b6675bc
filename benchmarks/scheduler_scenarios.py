"""serve_benchmark.py's scheduler scenarios (poisson, arrival, soak): continuous against static batching, each
server started fresh in the same run. See serve_benchmark.py's docstring for what each measures."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

MODEL = "smolvlm-256m-random"


def stream(base: str, body: Dict, on_chunk=None) -> Dict:
    """One streamed request with httpx: TTFT, latency, the gaps between content chunks, the text, usage."""
    import httpx

    body = dict(body, model=MODEL, stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    first, last, gaps, text, usage, reason = None, None, [], [], None, None
    with httpx.stream("POST", base + "/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            r.read()
            return dict(status=r.status_code, error=r.text)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
                    text.append(piece)
                    if on_chunk is not None:
                        on_chunk(len(text))
                reason = choice.get("finish_reason") or reason
    return dict(status=200, ttft=first, latency=time.perf_counter() - t0, max_gap=max(gaps, default=0.0),
                text="".join(text), completion_tokens=usage["completion_tokens"] if usage else None,
                finish_reason=reason)


def request(image, question: str, max_tokens: int, **extra) -> Dict:
    content = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + \
        [{"type": "text", "text": question}]
    return dict(messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **extra)


def start(bench, args, checkpoint: Path, scheduler: str):
    options = ["--max-batch-size", "8", "--scheduler", scheduler, "--max-model-len", "2048", *args.server_option]
    t0 = time.perf_counter()
    server = bench.ServerProcess(checkpoint, options=tuple(options))
    return server, time.perf_counter() - t0


def poisson(bench, args, server, images) -> Dict:
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1 / args.rate, args.requests))
    arrivals -= arrivals[0]
    bodies = poisson_bodies(bench, args, images, rng)
    results: List[Dict] = [None] * args.requests
    t0 = time.perf_counter()

    def client(i):
        time.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        sent = time.perf_counter()
        results[i] = dict(stream(server.base, bodies[i]), sent=sent - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r["status"] == 200]
    end = max(r["sent"] + r["latency"] for r in ok)
    tokens = sum(r["completion_tokens"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok)
    latency = sorted(r["latency"] for r in ok)
    return dict(requests=args.requests, mix=args.mix, answered=len(ok), rate_per_s=args.rate, seconds=round(end, 1),
                completion_tokens=tokens, tokens_per_s=round(tokens / end, 3),
                ttft_p50=round(bench.pct(ttft, 50), 2), ttft_p95=round(bench.pct(ttft, 95), 2),
                latency_p50=round(bench.pct(latency, 50), 2), latency_p95=round(bench.pct(latency, 95), 2),
                answers=[r["text"] for r in ok],
                per_request=[dict(sent=round(r["sent"], 2), ttft=round(r["ttft"], 2), latency=round(r["latency"], 2),
                                  image=bodies[i]["messages"][0]["content"][0]["type"] == "image_url")
                             for i, r in enumerate(results) if r["status"] == 200])


TEXT_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
                  "Explain in one sentence what a neural network is.", "Give me three names for a cat."]


def poisson_bodies(bench, args, images, rng) -> List[Dict]:
    """The requests of the poisson scenario (see serve_benchmark's docstring for --mix)."""
    if args.mix == "photos":
        return [request(images[i % len(images)], bench.QUESTIONS[i % len(bench.QUESTIONS)], args.max_tokens)
                for i in range(args.requests)]
    bodies, sent = [], []
    for i in range(args.requests):
        kind = rng.choice(["photo", "text", "again"], p=[0.4, 0.3, 0.3])
        if kind == "again" and sent:
            bodies.append(request(sent[int(rng.integers(len(sent)))], bench.QUESTIONS[1], args.max_tokens))
        elif kind == "text":
            bodies.append(request(None, TEXT_QUESTIONS[i % len(TEXT_QUESTIONS)], args.max_tokens))
        else:
            sent.append(images[len(sent) % len(images)])
            bodies.append(request(sent[-1], bench.QUESTIONS[0], args.max_tokens))
    return bodies


def arrival(bench, args, server, images) -> Dict:
    alone = stream(server.base, request(images[0], bench.QUESTIONS[0], args.max_tokens))
    # B's photo while A streams is another of the same size (as many tiles and tokens): with the photo B sent alone,
    # the image-feature cache and the parked row would give B its answer without the vision and prefill measured
    b_body = request(images[3], bench.QUESTIONS[0], args.max_tokens)
    a_body = request(images[1 % len(images)], "Tell me a very long story about this picture.", args.long_tokens)
    started = threading.Event()
    a_result: Dict = {}

    def run_a():
        a_result.update(stream(server.base, a_body, on_chunk=lambda n: n >= 20 and started.set()))
        started.set()

    thread = threading.Thread(target=run_a)
    thread.start()
    started.wait()
    a_streaming = thread.is_alive()
    b = stream(server.base, b_body)
    b_done_while_a_streams = thread.is_alive()
    thread.join()
    return dict(b_alone_ttft=round(alone["ttft"], 2), b_ttft_while_a_streams=round(b["ttft"], 2),
                bound_1_5x_plus_5s=round(1.5 * alone["ttft"] + 5, 2), within_bound=b["ttft"] <= 1.5 * alone["ttft"] + 5,
                b_finished_before_a=b_done_while_a_streams,
                a_was_streaming_when_b_sent=a_streaming, a_tokens=a_result.get("completion_tokens"),
                a_max_gap_s=round(a_result.get("max_gap", float("nan")), 2), a_ttft=round(a_result["ttft"], 2))


def soak(bench, args, server, images) -> Dict:
    from concurrent.futures import ThreadPoolExecutor

    kinds = [lambda i: request(None, f"Question {i % 5}: say something.", 8),
             lambda i: request(images[i % 3], bench.QUESTIONS[i % 2], 8),
             lambda i: request(images[0], "What is it?", 6),
             lambda i: dict(request(None, "Sampled, seeded.", 8), temperature=0.8, seed=i % 4)]
    bodies = [kinds[i % len(kinds)](i) for i in range(args.requests)]
    first_answer: Dict[str, str] = {}
    unstable, failed, rss = [], [], {}
    lock = threading.Lock()

    def one(i):
        r = stream(server.base, bodies[i])
        key = json.dumps(bodies[i], sort_keys=True)
        with lock:
            if r["status"] != 200:
                failed.append((i, r["status"]))
            elif first_answer.setdefault(key, r["text"]) != r["text"]:
                unstable.append(i)

    # RSS after every 20 requests, the clients idle (as tests/serve/test_serve_soak.py): a sample taken while
    # requests are in flight counts their pixels, features and caches, and a plateau and a leak look alike at 2 points
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, args.requests, 20):
            end = min(start + 20, args.requests)
            list(pool.map(one, range(start, end)))
            time.sleep(1.0)
            rss[end] = current_rss_mb(server.proc.pid)
    return dict(requests=args.requests, failed=failed, unstable_answers=unstable,
                rss_mb_after_20=rss.get(20), rss_mb_after_last=rss.get(args.requests),
                rss_ratio=round(rss[args.requests] / rss[20], 3) if 20 in rss else None,
                rss_mb_every_20={n: round(v, 1) for n, v in sorted(rss.items())})


def current_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main(args, bench) -> int:
    from bench.machine import describe
    from bench.report import write_json
    from mindone_idefics3.device import cpu_threads
    from mindone_idefics3.files import write_text_atomically

    os.environ.setdefault("GLOG_v", "3")
    load_at_start = os.getloadavg()[0]
    work = Path(args.work_dir)
    checkpoint = bench.serve_checkpoint(work)
    images = bench.photo_uris(work / "serve-photos", max(args.requests, 4) if args.scenario == "poisson" else 4,
                              args.width, args.height)
    run = {"poisson": poisson, "arrival": arrival, "soak": soak}[args.scenario]
    rows = []
    for scheduler in args.scheduler_list:
        server, ready = start(bench, args, checkpoint, scheduler)
        try:
            result = run(bench, args, server, images)
            result.update(scheduler=scheduler, start_to_ready_s=round(ready, 1),
                          server_peak_rss_mb=round(server.peak_rss_mb()))
        finally:
            server.stop()
        print(json.dumps({k: v for k, v in result.items() if k not in ("answers", "per_request")}), flush=True)
        rows.append(result)
    if args.scenario == "poisson" and len(rows) == 2:
        rows[0]["answers_equal_other_scheduler"] = rows[0]["answers"] == rows[1]["answers"]
    machine = dict(describe(cpu_threads(), "CPU"), load_average_1min_at_start=load_at_start,
                   load_average_1min_at_end=os.getloadavg()[0])
    out = Path(args.out)
    result = dict(machine=machine, scenario=args.scenario, photo_size=f"{args.width}x{args.height}",
                  server_options=args.server_option, max_tokens=args.max_tokens, rows=rows)
    write_json(out, result)
    keys = [k for k in rows[0] if k not in ("answers", "failed", "unstable_answers", "per_request")]
    lines = [f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores; MindSpore {machine['mindspore']}; "
             f"{machine['date']}; load average {load_at_start:.1f} at start, {machine['load_average_1min_at_end']:.1f}"
             f" at end. Scenario {args.scenario}; server options {' '.join(args.server_option) or '(defaults)'}.", "",
             "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
    table = "\n".join(lines)
    write_text_atomically(out.with_suffix(".md"), table + "\n")
    print(table)
    return 0
