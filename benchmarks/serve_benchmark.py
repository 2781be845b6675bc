"""idefics3-serve under concurrent clients: the real server (a subprocess on 127.0.0.1) with a SmolVLM-256M-shaped
checkpoint (random weights, fp32), spoken to with the `openai` client, streamed, image + question requests.

    python benchmarks/serve_benchmark.py                        # 1, 2, 4, 8 clients; 8 requests each; 256 tokens
    python benchmarks/serve_benchmark.py --concurrency 1,8 --requests 16 --max-tokens 128

The same list of requests (one photo each, one of two short questions) is sent at each level: with 1 client they go
one at a time; with c clients, c threads each send the next unsent request as soon as their previous answer ended
(closed loop). Before the timed levels, one untimed burst of 1, 2, 4 and 8 requests (each client leaves after 2
tokens) compiles the graphs of every batch shape (the server pads batches to 1/2/4/8 rows), so the timed runs
measure serving, not compiling.

Measured per level: aggregate completion tokens/s (all requests' completion tokens / the level's wall time), time
to first token (request sent → first streamed content) and latency (→ last chunk) p50/p95, the mean batch size
(from /metrics), and the server's peak RSS (VmHWM) at the end. Images: one 512-px tile per photo
(--no-image-splitting on the server: SmolVLM's default splitting makes 13 tiles of a 640x480 photo, too slow on this
CPU for a run of minutes). Every request asks for exactly --max-tokens tokens (the random model never picks a stop
token in practice: the completion counts are checked). The checkpoint's tokenizer is the demo one with an added
token for each id up to SmolVLM's 49280, so every generated id decodes to text and streams as a chunk.

Writes benchmarks/results/serve-smolvlm-256m-cpu.json and .md (the machine described: CPU model, cores, load).

Scenarios for the schedulers (`--scenario`, each runs the server once per scheduler, continuous and static, in the
same run, and writes serve-<scenario>-smolvlm-256m-cpu.json/.md):

    python benchmarks/serve_benchmark.py --scenario poisson --requests 16 --rate 0.05 --max-tokens 64
    python benchmarks/serve_benchmark.py --scenario arrival --long-tokens 600
    python benchmarks/serve_benchmark.py --scenario soak --requests 200 --schedulers continuous

- poisson: requests arrive at random (exponential gaps, mean 1/--rate s, seeded), each from its own client; TTFT
  and latency p50/p95, aggregate completion tokens/s (all tokens / first send → last end). --mix photos: each
  request a new photo (13 tiles at defaults: ~40 s of vision + prefill here, so 0.05/s is more than this CPU
  serves and both schedulers queue); --mix mixed, a server's traffic: 40% a new photo, 30% a text-only question,
  30% another question about a photo sent before (seeded draws).
- arrival: client A streams a --long-tokens answer; once A has streamed 20 tokens, client B sends a photo question
  (--max-tokens). B's TTFT against B alone (measured first, same server, another photo of the same size: nothing
  of B's is cached), A's largest gap between two chunks.
- soak: 4 clients send --requests short mixed requests (text only, photo, repeated photo, sampled with a seed);
  greedy answers compared with the first answer to the same request, server RSS after every 20 requests (the
  clients idle).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import batch_benchmark  # noqa: E402  (SmolVLM-shaped checkpoint with a tokenizer, photos)
from bench.machine import describe  # noqa: E402  (the benchmarks' shared package: benchmarks/bench)
from bench.report import write_json  # noqa: E402
from mindone_idefics3.files import write_text_atomically  # noqa: E402

READY = "idefics3-serve: ready at "
QUESTIONS = batch_benchmark.QUESTIONS[:2]  # the two short ones: every prompt lands in one prefill bucket
VOCAB = 49280  # SmolVLM-256M's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,2,4,8", help="comma list of client counts (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=8, help="requests sent at each level (default 8)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request (default 256)")
    p.add_argument("--photo-size", default="640x480", help="WIDTHxHEIGHT of the photos (default 640x480)")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"), help="checkpoint and photos")
    p.add_argument("--out", default=None, help="the JSON file (default benchmarks/results/serve[-SCENARIO]-smolvlm-256m-cpu"
                                                 ".json)")
    p.add_argument("--scenario", choices=["levels", "poisson", "arrival", "soak"], default="levels",
                   help="levels (default): closed-loop concurrency levels; see the module for the others")
    p.add_argument("--schedulers", default="continuous,static", help="scenarios other than levels: the servers "
                   "compared (default continuous,static)")
    p.add_argument("--rate", type=float, default=0.05, help="poisson: mean arrivals per second (default 0.05)")
    p.add_argument("--mix", choices=["photos", "mixed"], default="photos",
                   help="poisson: photos (default: every request a new photo) or mixed (new photos, text-only "
                        "questions, another question about a photo sent before; see the module)")
    p.add_argument("--long-tokens", type=int, default=600, help="arrival: client A's answer length (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-option", action="append", default=[], metavar="OPT",
                   help="extra idefics3-serve option (repeatable, e.g. --server-option=--no-image-splitting)")
    args = p.parse_args(argv)
    suffix = "" if args.scenario == "levels" else f"-{args.scenario}"
    suffix += "-mixed" if args.scenario == "poisson" and args.mix == "mixed" else ""
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"serve{suffix}-smolvlm-256m-cpu.json")
    args.scheduler_list = [x.strip() for x in args.schedulers.split(",") if x.strip()]
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.width, args.height = (int(v) for v in args.photo_size.lower().split("x"))
    if not args.levels or min(args.levels) < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be positive")
    return args


# ----------------------------------------------------------------------------------------------- inputs
def serve_checkpoint(work_dir: Path) -> Path:
    """batch_benchmark's SmolVLM-shaped checkpoint, its tokenizer extended with plain added tokens up to the model's
    vocabulary, so that every id the random model generates decodes to text."""
    from tokenizers import AddedToken

    from mindone_idefics3.demo import build_tokenizer

    path = batch_benchmark.batch_checkpoint(work_dir)
    tok = build_tokenizer()
    tok.add_tokens([AddedToken(f"<t{i}>", special=False, normalized=False)
                    for i in range(tok.get_vocab_size(), VOCAB)])
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(path / "tokenizer.json"))
    return path


def photo_uris(folder: Path, count: int, width: int, height: int) -> List[str]:
    import base64

    batch_benchmark.write_photos(folder, count, width, height)
    return ["data:image/jpeg;base64," + base64.b64encode((folder / f"photo-{i:03d}.jpg").read_bytes()).decode()
            for i in range(count)]


# ----------------------------------------------------------------------------------------------- the server
class ServerProcess:
    def __init__(self, checkpoint: Path, options=("--no-image-splitting", "--max-batch-size", "8")):
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mindone_idefics3.serve", "--model", str(checkpoint), "--port", "0",
             "--served-model-name", "smolvlm-256m-random", "--dtype", "fp32", "--device", "CPU", *options],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.log: List[str] = []
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr], daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=600)
            except queue.Empty:
                self.stop()
                raise SystemExit("the server did not get ready in 600 s:\n" + "".join(self.log))
            if line.startswith(READY):
                self.base = line[len(READY):].split()[0]
                self.root = self.base[:-len("/v1")]
                return

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(self.root + "/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(300)


# ----------------------------------------------------------------------------------------------- measuring
def messages(image: str, question: str) -> List[Dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": question}]}]


def warm_up_request(base: str, model: str, image: str, question: str, max_tokens: int) -> None:
    """A streamed request left after 3 chunks: the server frees the row; the graphs of its shape are compiled.
    (httpx, not the openai client: closing an openai stream early prints ignored exceptions in openai 3.x.)"""
    import httpx

    body = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True, messages=messages(image, question))
    with httpx.stream("POST", base + "/chat/completions", json=body, timeout=3600) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:  # role chunk, blank line, two content chunks
                return


def one_request(client, model: str, image: str, question: str, max_tokens: int) -> Dict:
    t0 = time.perf_counter()
    first, usage, reason = None, None, None
    stream = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, messages=messages(image, question))
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
        if chunk.usage:
            usage = chunk.usage
    return dict(ttft=first, latency=time.perf_counter() - t0, completion_tokens=usage.completion_tokens,
                prompt_tokens=usage.prompt_tokens, finish_reason=reason)


def run_level(server: ServerProcess, client, model: str, requests: List[tuple], clients: int,
              max_tokens: int) -> Dict:
    batches0 = server.metric("idefics3_batches_total")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: one_request(client, model, r[0], r[1], max_tokens), requests))
    wall = time.perf_counter() - t0
    batches = server.metric("idefics3_batches_total") - batches0
    tokens = sum(r["completion_tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    latency = sorted(r["latency"] for r in results)
    return dict(clients=clients, requests=len(results), seconds=round(wall, 2), completion_tokens=tokens,
                tokens_per_s=round(tokens / wall, 2), ttft_p50=round(pct(ttft, 50), 2),
                ttft_p95=round(pct(ttft, 95), 2), latency_p50=round(pct(latency, 50), 2),
                latency_p95=round(pct(latency, 95), 2), batches=int(batches),
                mean_requests_per_batch=round(len(results) / batches, 2) if batches else None,
                finish_reasons=sorted({r["finish_reason"] for r in results}),
                prompt_tokens=sorted({r["prompt_tokens"] for r in results}))


def pct(values: List[float], q: float) -> float:
    """The q-th percentile (linear interpolation); values sorted."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else values[-1]


def markdown(result: Dict) -> str:
    m = result["machine"]
    base = next((r for r in result["levels"] if r["clients"] == 1), None)
    lines = [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gb']} GB RAM; MindSpore {m['mindspore']}; "
             f"{m['date']}; load average {m['load_average_1min_at_start']:.1f} at start, "
             f"{m['load_average_1min_at_end']:.1f} at end (the machine is shared).",
             f"Server: idefics3-serve, {result['checkpoint_shapes']}, random weights, fp32, --no-image-splitting "
             f"(one 512-px tile per {result['photo_size']} photo), batches padded to 1/2/4/8 rows; peak RSS "
             f"{result['server_peak_rss_mb']:.0f} MB. {result['requests_per_level']} requests per level, "
             f"max_tokens {result['max_tokens']}, greedy, streamed; warm-up (compiling every batch shape) "
             f"{result['warmup_seconds']:.0f} s, not timed.", "",
             "| clients | requests | wall (s) | completion tokens | aggregate tokens/s | x 1 client | TTFT p50 (s) "
             "| TTFT p95 (s) | latency p50 (s) | latency p95 (s) | requests per batch |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["levels"]:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "—"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['seconds']:.1f} | {r['completion_tokens']} | "
                     f"{r['tokens_per_s']:.2f} | {ratio} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
                     f"{r['latency_p50']:.2f} | {r['latency_p95']:.2f} | {r['mean_requests_per_batch']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scenario != "levels":
        import scheduler_scenarios

        return scheduler_scenarios.main(args, sys.modules[__name__])
    load_at_start = os.getloadavg()[0]
    os.environ.setdefault("GLOG_v", "3")
    import openai
    from tqdm import tqdm

    from mindone_idefics3.device import cpu_threads

    work = Path(args.work_dir)
    checkpoint = serve_checkpoint(work)
    images = photo_uris(work / "serve-photos", args.requests, args.width, args.height)
    requests = [(images[i], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)]
    print("starting the server (loading the model) ...", file=sys.stderr, flush=True)
    server = ServerProcess(checkpoint)
    model = "smolvlm-256m-random"
    client = openai.OpenAI(base_url=server.base, api_key="none", max_retries=0, timeout=3600)
    try:
        t0 = time.perf_counter()
        for burst in tqdm([1, 2, 4, 8], desc="warm-up (compiling batch shapes 1/2/4/8)", file=sys.stderr):
            with ThreadPoolExecutor(burst) as pool:
                list(pool.map(lambda r: warm_up_request(server.base, model, r[0], r[1], args.max_tokens),
                              [requests[i % len(requests)] for i in range(burst)]))
        warmup = time.perf_counter() - t0
        levels = []
        for clients in tqdm(args.levels, desc="timed levels", file=sys.stderr):
            levels.append(run_level(server, client, model, requests, clients, args.max_tokens))
            print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
        peak = server.peak_rss_mb()
    finally:
        code = server.stop()
    short = [r for r in levels if r["completion_tokens"] != r["requests"] * args.max_tokens]
    machine = dict(describe(cpu_threads(), "CPU"), load_average_1min_at_start=load_at_start,
                   load_average_1min_at_end=os.getloadavg()[0], uptime=_uptime())
    result = dict(machine=machine, checkpoint_shapes="smolvlm-256m (bench preset)",
                  photo_size=f"{args.width}x{args.height}", requests_per_level=args.requests,
                  max_tokens=args.max_tokens, warmup_seconds=round(warmup, 1), server_peak_rss_mb=round(peak),
                  server_exit_code=code, levels=levels,
                  levels_with_early_stops=[r["clients"] for r in short], definitions=__doc__)
    out = Path(args.out)
    write_json(out, result)
    table = markdown(result)
    write_text_atomically(out.with_suffix(".md"), table + "\n")
    print(table)
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
