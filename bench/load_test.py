"""Load test: API calls and chat streams against one server while a job trains (loopback only).

    python bench/load_test.py [--calls 200] [--streams 32] [--model tiny|default] [--max-tokens 16]
                              [--database-url postgresql+psycopg://...]

Starts `tunehouse serve` on a fresh temporary home (SQLite unless --database-url; the tiny random
2-layer Llama of bench/fault_injection.py as base model `tiny`, or the embedded default model),
uploads a training file and starts a fine-tuning job (long enough to keep training throughout),
then fires, all at once, --calls API calls (a mix of files.list, fine_tuning.jobs.list,
jobs.retrieve, jobs.list_events, models.list, files.retrieve) and --streams streaming chat
completions against the base model, from one thread each. Prints errors (must be 0), p50/p99/max
latency per kind (for a stream: time to first token and total), and whether the job kept training
meanwhile. Bounded: every call has a timeout, and the whole run --max-seconds.
Exits 0 only when there was no error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import MODELS_DIR, build_tiny_model, free_port, training_jsonl  # noqa: E402

ADMIN_KEY = "sk-load-test-admin-key-000000000000"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--model", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for one call")
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--database-url", default=None)
    args = ap.parse_args()
    from openai import OpenAI

    started = time.time()
    home = Path(tempfile.mkdtemp(prefix="tunehouse-load-"))
    port = free_port()
    base = "tiny" if args.model == "tiny" else "smollm2-135m-instruct"
    env = dict(os.environ)
    env.update(
        TUNEHOUSE_HOME=str(home),
        TUNEHOUSE_MODELS_DIR=str(MODELS_DIR),
        TUNEHOUSE_BASE_MODELS=json.dumps({"tiny": str(build_tiny_model())}),
        TUNEHOUSE_ADMIN_KEY=ADMIN_KEY,
        TOKENIZERS_PARALLELISM="false",
    )
    if args.database_url:
        env["TUNEHOUSE_DATABASE_URL"] = args.database_url
    log = open(home / "server.log", "ab")  # noqa: SIM115 - kept by the child
    server = subprocess.Popen(
        [sys.executable, "-m", "tunehouse", "serve", "--port", str(port), "--home", str(home)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            except urllib.error.HTTPError:
                break  # 401: it answers
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start; see " + str(home / "server.log")) from None
                time.sleep(0.3)
            else:
                break
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ADMIN_KEY, max_retries=0)
        f = client.files.create(file=("train.jsonl", training_jsonl() * 4), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny",
            training_file=f.id,
            seed=1,
            hyperparameters={"n_epochs": 50, "batch_size": 1, "learning_rate_multiplier": 1},
        )
        while client.fine_tuning.jobs.retrieve(job.id).status != "running":
            if time.time() - started > 240:
                raise SystemExit("the job did not start training")
            time.sleep(0.5)
        # Let it train a little, and warm the inference engine once (loading the base model is a
        # one-off, not what this test measures).
        client.chat.completions.create(model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=2)

        def steps() -> int:
            ev = client.fine_tuning.jobs.list_events(job.id, limit=1)
            return next((e.data["step"] for e in ev.data if e.type == "metrics"), 0)

        step_before = steps()
        calls = [
            ("files.list", lambda c: c.files.list()),
            ("jobs.list", lambda c: c.fine_tuning.jobs.list(limit=20)),
            ("jobs.retrieve", lambda c: c.fine_tuning.jobs.retrieve(job.id)),
            ("jobs.list_events", lambda c: c.fine_tuning.jobs.list_events(job.id, limit=50)),
            ("models.list", lambda c: c.models.list()),
            ("files.retrieve", lambda c: c.files.retrieve(f.id)),
        ]
        results: dict[str, list[float]] = {}
        errors: list[str] = []
        lock = threading.Lock()
        gate = threading.Barrier(args.calls + args.streams)

        def record(kind: str, seconds: float) -> None:
            with lock:
                results.setdefault(kind, []).append(seconds)

        def api_call(i: int) -> None:
            kind, fn = calls[i % len(calls)]
            c = OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=args.timeout
            )
            gate.wait()
            t = time.perf_counter()
            try:
                fn(c)
                record(kind, time.perf_counter() - t)
            except Exception as e:
                with lock:
                    errors.append(f"{kind}: {type(e).__name__}: {e}")

        def chat_stream(i: int) -> None:
            c = OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=args.timeout
            )
            gate.wait()
            t = time.perf_counter()
            first = None
            try:
                stream = c.chat.completions.create(
                    model=base,
                    messages=[{"role": "user", "content": f"Say something about the number {i}."}],
                    max_tokens=args.max_tokens,
                    stream=True,
                )
                chunks = 0
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t
                    chunks += 1
                if chunks == 0:
                    raise RuntimeError("empty stream")
                record("chat.stream first token", first if first is not None else time.perf_counter() - t)
                record("chat.stream total", time.perf_counter() - t)
            except Exception as e:
                with lock:
                    errors.append(f"chat stream: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=api_call, args=(i,)) for i in range(args.calls)]
        threads += [threading.Thread(target=chat_stream, args=(i,)) for i in range(args.streams)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=max(1.0, args.max_seconds - (time.time() - started)))
        wall = time.perf_counter() - t0
        hung = sum(th.is_alive() for th in threads)
        step_after = steps()
        status = client.fine_tuning.jobs.retrieve(job.id).status

        print(f"\n{args.calls} API calls + {args.streams} chat streams ({base}, max_tokens {args.max_tokens}), "
              f"all at once, while job {job.id} trains; wall {wall:.1f} s")  # fmt: skip
        print(f"{'kind':28} {'n':>4} {'p50 s':>8} {'p99 s':>8} {'max s':>8}")
        all_api: list[float] = []
        for kind, vals in sorted(results.items()):
            if not kind.startswith("chat"):
                all_api += vals
            print(f"{kind:28} {len(vals):4d} {pct(vals, 50):8.3f} {pct(vals, 99):8.3f} {max(vals):8.3f}")
        if all_api:
            print(f"{'all API calls':28} {len(all_api):4d} {pct(all_api, 50):8.3f} {pct(all_api, 99):8.3f} "
                  f"{max(all_api):8.3f}   (mean {statistics.mean(all_api):.3f})")  # fmt: skip
        print(f"errors: {len(errors)}   unfinished: {hung}")
        for e in errors[:10]:
            print("  ", e)
        print(f"the job trained on: step {step_before} -> {step_after} during the load (status {status})")
        if errors:
            text = (home / "server.log").read_text(errors="replace").splitlines()
            print("server log, last error lines:")
            for line in [ln for ln in text if "Error" in ln or "error" in ln][-8:]:
                print("  ", line[:300])
        client.fine_tuning.jobs.cancel(job.id)
        return 0 if not errors and not hung else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
