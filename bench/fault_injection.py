"""Fault injection: kill workers, servers and training children at random moments and count the
fine-tuning jobs that were lost, duplicated or corrupted (the figure must be 0).

    python bench/fault_injection.py [--trials 20] [--max-minutes 25] [--jobs-per-trial 2]
                                    [--workers 2] [--server-worker] [--seed N]
                                    [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/DB]

One home (a fresh temporary folder; SQLite in it unless --database-url names a PostgreSQL database,
which is created fresh and must not exist yet), one `tunehouse serve` (with `--no-worker` unless
--server-worker) and --workers `tunehouse worker` processes on that home, a tiny random 2-layer
Llama with SmolLM2's tokenizer (built once under /tmp) as the base model `tiny`, leases of
--lease-seconds (4) and training state saved every second.

Each trial submits --jobs-per-trial jobs (10 chat examples, batch 1, 2-4 epochs: 20-40 optimizer
steps) through the openai SDK, then 1..--max-kills-per-trial times: waits 0.5-8 s, sends SIGKILL or
SIGTERM (at random) to a random victim among the worker processes, the server process and the
`tunehouse.jobs.runner` children (validate or train phase; --runner-phases), and restarts a killed
server or worker after 0.2-3 s. The trial ends when every job of its batch is terminal or after
--trial-timeout seconds; --max-minutes bounds the whole run (trials stop being started, and the
last batch gets what is left plus a grace period).

Every job is then checked through the API and the database:
  lost        not `succeeded` in time, or failed (its error is printed);
  duplicated  a metrics step reported twice, or 'Fine-tuning job started' more than once (the proxy
              for one job trained by two processes at once), or metrics steps out of order between
              two 'resumed' events;
  corrupted   a metrics step missing, a result CSV whose rows are not steps 1..total, checkpoints
              that are not one per epoch for the last 3 epochs, or whose weights folder is missing
              adapter_config.json / adapter_model.safetensors or holds NaN/Inf tensors.
Prints a summary table; exits 0 only if lost == duplicated == corrupted == 0.
Not a unit test: it takes minutes, and uses processes, signals and loopback HTTP only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / ".cache" / "models"
TINY_DIR = Path("/tmp/tunehouse-fi-tiny-model")
ADMIN_KEY = "sk-fault-injection-admin-key-0000000000"
TERMINAL = {"succeeded", "failed", "cancelled"}
N_EXAMPLES = 10
CHECKPOINTS_KEPT = 3


# --- setup -----------------------------------------------------------------------------------------
def build_tiny_model() -> Path:
    """The tests' tiny model (tests/tiny_model.py), built once per machine."""
    if (TINY_DIR / "config.json").exists() and (TINY_DIR / "tokenizer_config.json").exists():
        return TINY_DIR
    sys.path.insert(0, str(REPO))
    from tests.tiny_model import build_tiny_model as build

    tmp = build(
        MODELS_DIR / "smollm2-135m-instruct", Path(tempfile.mkdtemp(prefix="tunehouse-fi-tiny-", dir="/tmp"))
    )
    try:
        tmp.rename(TINY_DIR)
    except OSError:  # built meanwhile by another run
        shutil.rmtree(tmp, ignore_errors=True)
    return TINY_DIR


def training_jsonl() -> bytes:
    lines = []
    for i in range(N_EXAMPLES):
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You classify support tickets."},
                        {"role": "user", "content": f"Ticket {i}: my order #{1000 + i} has not arrived."},
                        {"role": "assistant", "content": json.dumps({"category": "shipping", "id": i})},
                    ]
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_pg_database(url: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    u = make_url(url)
    name = u.database
    if not name or name == "postgres":
        name = f"tunehouse_fi_{uuid.uuid4().hex[:10]}"
        u = u.set(database=name)
    admin = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        if c.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            raise SystemExit(f"database {name!r} already exists: name a fresh one (it is created here)")
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return u.render_as_string(hide_password=False)


# --- processes -------------------------------------------------------------------------------------
@dataclass
class Proc:
    kind: str  # "server" | "worker"
    index: int
    popen: subprocess.Popen | None = None
    starts: int = 0


class Cluster:
    def __init__(self, args, home: Path, db_url: str, run_tag: str):
        self.args = args
        self.home = home
        self.db_url = db_url
        self.run_tag = run_tag
        self.port = free_port()
        self.logs = home / "fi-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(
            TUNEHOUSE_HOME=str(home),
            TUNEHOUSE_DATABASE_URL=db_url,
            TUNEHOUSE_MODELS_DIR=str(MODELS_DIR),
            TUNEHOUSE_BASE_MODELS=json.dumps({"tiny": str(TINY_DIR)}),
            TUNEHOUSE_ADMIN_KEY=ADMIN_KEY,
            TUNEHOUSE_LEASE_SECONDS=str(args.lease_seconds),
            TUNEHOUSE_STATE_SAVE_SECONDS=str(args.state_save_seconds),
            TUNEHOUSE_FI_RUN=run_tag,  # inherited by the runner children: how we find ours
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            TOKENIZERS_PARALLELISM="false",
        )
        self.server = Proc("server", 0)
        self.workers = [Proc("worker", i) for i in range(args.workers)]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, p: Proc) -> None:
        if p.kind == "server":
            cmd = [
                sys.executable,
                "-m",
                "tunehouse",
                "serve",
                "--port",
                str(self.port),
                "--home",
                str(self.home),
            ]
            if not self.args.server_worker:
                cmd.append("--no-worker")
        else:
            cmd = [sys.executable, "-m", "tunehouse", "worker", "--home", str(self.home)]
        p.starts += 1
        log = open(self.logs / f"{p.kind}{p.index}.log", "ab")  # noqa: SIM115 (kept by the child)
        log.write(f"\n===== start {p.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        p.popen = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO
        )
        log.close()

    def server_ready(self) -> bool:
        try:
            req = urllib.request.Request(
                f"{self.base_url}/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def wait_server(self, timeout: float = 90) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if self.server_ready():
                return True
            if self.server.popen is not None and self.server.popen.poll() is not None:
                self.start(self.server)  # died during start (e.g. port race): start it again
            time.sleep(0.3)
        return False

    def runners(self) -> list[tuple[int, str, str]]:
        """(pid, phase, job_id) of every `tunehouse.jobs.runner` process of this run."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if b"tunehouse.jobs.runner" not in argv:
                    continue
                if f"TUNEHOUSE_FI_RUN={self.run_tag}".encode() not in (d / "environ").read_bytes().split(
                    b"\0"
                ):
                    continue
                i = argv.index(b"tunehouse.jobs.runner")
                out.append((int(d.name), argv[i + 1].decode(), argv[i + 2].decode()))
            except (OSError, IndexError, ValueError):
                continue
        return out

    def stop_all(self) -> None:
        for p in [self.server, *self.workers]:
            if p.popen is not None and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in [self.server, *self.workers]:
            if p.popen is not None:
                try:
                    p.popen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
        for pid, _, _ in self.runners():  # orphans of killed workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the database, read directly -------------------------------------------------------------------
class Db:
    def __init__(self, url: str):
        from sqlalchemy import create_engine

        self.engine = create_engine(url)

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from tunehouse.store.tables import Job

        with Session(self.engine) as s:
            return dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())

    def job_by_tag(self, tag: str) -> str | None:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from tunehouse.store.tables import Job

        with Session(self.engine) as s:
            for jid, md in s.execute(select(Job.id, Job.metadata_)).all():
                if (md or {}).get("fi_tag") == tag:
                    return jid
        return None

    def details(self, job_id: str):
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from tunehouse.store.tables import Checkpoint, Job, JobEvent

        with Session(self.engine) as s:
            job = s.scalar(select(Job).where(Job.id == job_id))
            events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
            ckpts = list(
                s.scalars(
                    select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number)
                )
            )
            s.expunge_all()
            return job, events, ckpts


# --- checks ----------------------------------------------------------------------------------------
@dataclass
class Verdict:
    job_id: str
    trial: int
    status: str
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    resumes: int = 0
    takeovers: int = 0
    retries: int = 0
    attempts: int = 0


def check_weights(folder: Path) -> str | None:
    from safetensors import safe_open

    if not folder.is_dir():
        return f"weights folder {folder} missing"
    cfg, st = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg.exists() or not st.exists():
        return f"{folder}: adapter_config.json or adapter_model.safetensors missing"
    try:
        json.loads(cfg.read_text())
        import torch

        with safe_open(str(st), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                return f"{st}: no tensors"
            for k in keys:
                t = f.get_tensor(k)
                if not torch.isfinite(t.float()).all():
                    return f"{st}: tensor {k} has NaN/Inf"
    except Exception as e:  # unreadable = corrupted
        return f"{folder}: unreadable ({type(e).__name__}: {e})"
    return None


def check_job(job_id: str, trial: int, client, db: Db, weights_dir: Path) -> Verdict:
    job, events, ckpts = db.details(job_id)
    api_status = None
    try:
        api_job = client.fine_tuning.jobs.retrieve(job_id)
        api_status = api_job.status
    except Exception as e:
        api_job = None
        api_status = f"api error {type(e).__name__}"
    v = Verdict(job_id, trial, job.status, attempts=job.attempts or 0)
    if api_status != job.status:
        v.corrupted.append(f"API status {api_status} != database status {job.status}")
    msgs = [e.message for e in events]
    v.resumes = sum(m.startswith("Fine-tuning job resumed from step") for m in msgs)
    v.takeovers = sum(m.startswith("The worker running this job stopped") for m in msgs)
    v.retries = sum(m.startswith("Retrying:") for m in msgs)
    if job.status != "succeeded":
        err = job.error or {}
        v.lost.append(f"status {job.status}" + (f": {err.get('code')}: {err.get('message')}" if err else ""))
        return v

    method = job.method[job.method["type"]]["hyperparameters"]
    n_epochs, batch = int(method["n_epochs"]), int(method["batch_size"])
    per_epoch = -(-N_EXAMPLES // batch)
    total = n_epochs * per_epoch

    # metrics: every step 1..total exactly once
    steps = [(e.data or {}).get("step") for e in events if e.type == "metrics"]
    totals = {(e.data or {}).get("total_steps") for e in events if e.type == "metrics"}
    if totals != {total}:
        v.corrupted.append(f"metrics total_steps {sorted(totals, key=str)} != {total}")
    c = Counter(steps)
    dup = sorted(s for s, n in c.items() if n > 1)
    if dup:
        v.duplicated.append(f"metrics steps reported more than once: {dup}")
    missing = sorted(set(range(1, total + 1)) - set(c))
    if missing:
        v.corrupted.append(f"metrics steps missing: {missing}")
    extra = sorted(s for s in c if not (isinstance(s, int) and 1 <= s <= total))
    if extra:
        v.corrupted.append(f"metrics steps out of range: {extra}")
    # order: between two 'resumed' markers, steps strictly increase (else two trainers interleaved)
    last = 0
    for e in events:
        if e.message.startswith("Fine-tuning job resumed from step"):
            last = int(e.message.rsplit(" ", 1)[1])
        elif e.type == "metrics":
            s = (e.data or {}).get("step", 0)
            if s <= last:
                v.duplicated.append(f"metrics step {s} after step {last} without a resume in between")
                break
            last = s
    starts = msgs.count("Fine-tuning job started")
    if starts != 1:
        v.duplicated.append(f"'Fine-tuning job started' {starts} times")
    if msgs.count("The job has successfully completed") != 1:
        v.duplicated.append(
            f"'successfully completed' {msgs.count('The job has successfully completed')} times"
        )

    # checkpoints: one per epoch end for the last 3 epochs, the last one final, weights loadable
    want = [e * per_epoch for e in range(max(1, n_epochs - CHECKPOINTS_KEPT + 1), n_epochs + 1)]
    got = [ck.step_number for ck in ckpts]
    if got != want:
        v.corrupted.append(f"checkpoint steps {got} != {want}")
    finals = [ck for ck in ckpts if ck.is_final]
    if len(finals) != 1 or finals[0].step_number != total or finals[0].model_name != job.fine_tuned_model:
        v.corrupted.append(f"final checkpoint wrong: {[(ck.step_number, ck.model_name) for ck in finals]}")
    for ck in ckpts:
        problem = check_weights(weights_dir / ck.path)
        if problem:
            v.corrupted.append(problem)
    try:
        api_ckpts = client.fine_tuning.jobs.checkpoints.list(job_id, limit=100).data
        if sorted(x.step_number for x in api_ckpts) != want:
            v.corrupted.append(f"API checkpoints {sorted(x.step_number for x in api_ckpts)} != {want}")
    except Exception as e:
        v.corrupted.append(f"API checkpoints: {type(e).__name__}: {e}")

    # the result file: one row per step, steps 1..total
    if len(job.result_files or []) != 1:
        v.corrupted.append(f"result_files {job.result_files}")
    else:
        try:
            text = base64.b64decode(client.files.content(job.result_files[0]).read()).decode()
            rows = list(csv.DictReader(io.StringIO(text)))
            rsteps = [int(r["step"]) for r in rows]
            if rsteps != list(range(1, total + 1)):
                v.corrupted.append(
                    f"result CSV has {len(rows)} rows (steps {rsteps[:5]}…), expected 1..{total}"
                )
        except Exception as e:
            v.corrupted.append(f"result file unreadable: {type(e).__name__}: {e}")
    return v


# --- the run ---------------------------------------------------------------------------------------
def api_call(fn, deadline: float, what: str):
    """Retry while the server is down (it is one of the victims)."""
    import openai

    while True:
        try:
            return fn()
        except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError):
            if time.time() > deadline:
                raise RuntimeError(f"{what}: server unreachable") from None
            time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--max-minutes", type=float, default=25.0)
    ap.add_argument("--jobs-per-trial", type=int, default=2)
    ap.add_argument("--max-kills-per-trial", type=int, default=2)
    ap.add_argument("--trial-timeout", type=float, default=180.0, help="seconds for one trial's batch")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--server-worker", action="store_true", help="the server runs a worker too")
    ap.add_argument("--runner-phases", default="validate,train", help="runner phases that may be killed")
    ap.add_argument("--victims", default="worker,server,runner", help="victim kinds to choose from")
    ap.add_argument("--lease-seconds", type=float, default=4.0)
    ap.add_argument("--state-save-seconds", type=float, default=1.0)
    ap.add_argument("--database-url", default=None, help="postgresql+psycopg://…/DB (created fresh)")
    ap.add_argument("--home", type=Path, default=None, help="default: a fresh folder under /tmp")
    ap.add_argument("--keep", action="store_true", help="keep the home (always kept on failure)")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    t0 = time.time()
    hard_end = t0 + args.max_minutes * 60
    sys.path.insert(0, str(REPO / "src"))
    from openai import OpenAI

    build_tiny_model()
    home = args.home or Path(tempfile.mkdtemp(prefix="tunehouse-fi-", dir="/tmp"))
    home.mkdir(parents=True, exist_ok=True)
    db_url = (
        create_pg_database(args.database_url) if args.database_url else f"sqlite:///{home / 'tunehouse.db'}"
    )
    run_tag = uuid.uuid4().hex[:12]
    print(f"fault injection: seed {seed}, home {home}, database {db_url.split('@')[-1]}", flush=True)
    cluster = Cluster(args, home, db_url, run_tag)
    phases = set(args.runner_phases.split(","))
    victim_kinds = args.victims.split(",")

    kills: Counter = Counter()
    trials_done = 0
    job_trial: dict[str, int] = {}
    verdicts: list[Verdict] = []
    client = OpenAI(base_url=cluster.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=30)
    db = None
    try:
        cluster.start(cluster.server)
        if not cluster.wait_server(180):
            raise SystemExit("the server did not start; see " + str(cluster.logs))
        for w in cluster.workers:  # after the server: it ran the migrations
            cluster.start(w)
        db = Db(db_url)
        train_file = client.files.create(file=("fi_train.jsonl", training_jsonl()), purpose="fine-tune").id

        for trial in range(1, args.trials + 1):
            if time.time() > hard_end - 30:
                print(f"time bound reached before trial {trial}", flush=True)
                break
            cluster.wait_server(60)
            # submit the batch (a create whose answer was lost is found again by its tag)
            batch = []
            for j in range(args.jobs_per_trial):
                tag = f"{run_tag}-{trial}-{j}"

                def create(tag=tag, trial=trial):
                    found = db.job_by_tag(tag)
                    if found:
                        return found
                    return client.fine_tuning.jobs.create(
                        model="tiny",
                        training_file=train_file,
                        seed=rng.randrange(1000),
                        suffix=f"fi{trial}",
                        metadata={"fi_tag": tag},
                        method={
                            "type": "supervised",
                            "supervised": {
                                "hyperparameters": {
                                    "n_epochs": rng.choice([2, 3, 4]),
                                    "batch_size": 1,
                                    "learning_rate_multiplier": 1,
                                }
                            },
                        },
                    ).id

                jid = api_call(create, time.time() + 60, "create job")
                batch.append(jid)
                job_trial[jid] = trial
            trial_end = min(time.time() + args.trial_timeout, hard_end + 60)
            n_kills = rng.randint(1, args.max_kills_per_trial)
            restarts: list[tuple[float, Proc]] = []
            kills_done = 0
            next_kill = time.time() + rng.uniform(0.5, 8.0)
            log = []
            while time.time() < trial_end:
                now = time.time()
                for when, p in list(restarts):
                    if now >= when:
                        cluster.start(p)
                        restarts.remove((when, p))
                sts = db.statuses(batch)
                if all(sts.get(j) in TERMINAL for j in batch) and not restarts:
                    break
                if kills_done < n_kills and now >= next_kill:
                    candidates = []
                    if "worker" in victim_kinds:
                        candidates += [
                            ("worker", w) for w in cluster.workers if w.popen and w.popen.poll() is None
                        ]
                    if (
                        "server" in victim_kinds
                        and cluster.server.popen
                        and cluster.server.popen.poll() is None
                    ):
                        candidates.append(("server", cluster.server))
                    if "runner" in victim_kinds:
                        candidates += [("runner", r) for r in cluster.runners() if r[1] in phases]
                    if candidates:
                        # a kind first, then a victim of that kind
                        kind = rng.choice(sorted({k for k, _ in candidates}))
                        _, victim = rng.choice([c for c in candidates if c[0] == kind])
                        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                        if kind == "runner":
                            pid, phase, jid = victim
                            label = f"runner-{phase}"
                            try:
                                os.kill(pid, sig)
                            except ProcessLookupError:
                                label = None
                            what = f"{label} of {jid} (pid {pid})"
                        else:
                            label = kind
                            victim.popen.send_signal(sig)
                            what = f"{kind}{victim.index} (pid {victim.popen.pid})"
                            restarts.append((time.time() + rng.uniform(0.2, 3.0), victim))
                        if label:
                            kills[f"{label} {sig.name}"] += 1
                            kills_done += 1
                            log.append(f"{time.time() - t0:7.1f}s {sig.name} {what}")
                    next_kill = time.time() + rng.uniform(0.5, 8.0)
                # reap killed processes (a SIGTERMed one may take a while to stop gracefully)
                for p in [cluster.server, *cluster.workers]:
                    if p.popen is not None:
                        p.popen.poll()
                time.sleep(0.2)
            for _when, p in restarts:  # the trial ended before a restart was due
                cluster.start(p)
            sts = db.statuses(batch)
            trials_done += 1
            print(
                f"trial {trial:2d} ({time.time() - t0:6.1f}s): "
                + "; ".join(log or ["no victim was running"])
                + " -> "
                + ", ".join(f"{j}={sts.get(j)}" for j in batch),
                flush=True,
            )

        # let stragglers finish (taken over after a lease, retried, …)
        grace_end = max(hard_end, time.time()) + 120
        pending = [j for j in job_trial]
        while time.time() < grace_end:
            for p in [cluster.server, *cluster.workers]:
                if p.popen is not None and p.popen.poll() is not None:
                    cluster.start(p)
            sts = db.statuses(pending)
            if all(s in TERMINAL for s in sts.values()):
                break
            time.sleep(1)
        cluster.wait_server(60)
        for jid, trial in job_trial.items():
            verdicts.append(check_job(jid, trial, client, db, home / "weights"))
    finally:
        cluster.stop_all()

    # --- report -----------------------------------------------------------------------------------
    wall = time.time() - t0
    lost = [v for v in verdicts if v.lost]
    dup = [v for v in verdicts if v.duplicated]
    cor = [v for v in verdicts if v.corrupted]
    print()
    for v in verdicts:
        for kind, items in (("LOST", v.lost), ("DUPLICATED", v.duplicated), ("CORRUPTED", v.corrupted)):
            for it in items:
                print(f"  trial {v.trial:2d} {v.job_id} {kind}: {it}  (attempts {v.attempts})")
    rows = [
        ("database", db_url.split("://")[0]),
        ("seed", seed),
        ("trials", trials_done),
        ("kills", sum(kills.values())),
        *[(f"  {k}", n) for k, n in sorted(kills.items())],
        ("server/worker restarts", sum(p.starts - 1 for p in [cluster.server, *cluster.workers])),
        ("jobs", len(verdicts)),
        ("succeeded", sum(v.status == "succeeded" for v in verdicts)),
        ("lost", len(lost)),
        ("duplicated", len(dup)),
        ("corrupted", len(cor)),
        ("resumes seen (events)", sum(v.resumes for v in verdicts)),
        ("takeovers (lease expired)", sum(v.takeovers for v in verdicts)),
        ("retries (child died)", sum(v.retries for v in verdicts)),
        ("wall time", f"{wall:.0f} s"),
    ]
    width = max(len(str(k)) for k, _ in rows)
    print("\n" + "=" * (width + 14))
    for k, val in rows:
        print(f"{k:<{width}}  {val}")
    print("=" * (width + 14))
    ok = bool(verdicts) and not (lost or dup or cor) and trials_done >= 1
    if ok and not args.keep and args.home is None:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"home kept: {home} (process logs in {cluster.logs}, job logs in {home / 'jobs'})")
    if ok and args.database_url:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        if db is not None:
            db.engine.dispose()
        name = make_url(db_url).database
        admin = create_engine(make_url(db_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
