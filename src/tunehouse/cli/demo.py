"""The main job, end to end over real HTTP: start a server, upload the example tickets data,
fine-tune the embedded default model with live progress (the job scores its checkpoints with the
example eval's exact-JSON grader, keeps the best one and runs the forgetting and safety checks),
then compare the fine-tuned model with its base on held-out prompts through one eval run each
(`examples/tickets_eval.json`, OpenAI's Evals API)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunehouse import ids
from tunehouse.cli.evals import criterion_names
from tunehouse.store.catalog import DEFAULT_MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(home: Path, port: int, key: str, console: Console) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "demo-server.log", "ab")  # noqa: SIM115 - lives as long as the server
    env = {**os.environ, "TUNEHOUSE_ADMIN_KEY": key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunehouse", "serve", "--port", str(port), "--home", str(home)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    import httpx2 as httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited (code {proc.returncode}); see {home / 'demo-server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("the server did not start within 180 s")


def _print_dashboard(port: int, key: str, job_id: str, console: Console) -> None:
    """Where to look at it all in a browser: the dashboard signs in with the demo's admin key."""
    console.rule("dashboard")
    console.print(f"Dashboard: http://127.0.0.1:{port}/dashboard/  (the job: #/jobs/{job_id})")
    console.print(f"Sign in with the demo server's admin key: {key}")


def _plain_grader(criterion: dict) -> dict:
    """An eval's testing criterion as a plain grader (a grader has no pass threshold)."""
    return {k: v for k, v in criterion.items() if k != "pass_threshold"}


def _print_evaluation(evaluation: dict, console: Console) -> None:
    """What the job measured: validation scores, the checkpoint it chose, the general checks."""
    if "base_score" in evaluation:
        chosen = evaluation.get("chosen") or {}
        console.print(
            f"validation score ({', '.join(evaluation['graders'])}): base {evaluation['base_score']:.2f}, "
            f"fine-tuned {chosen.get('valid_score', float('nan')):.2f} (checkpoint of step {chosen.get('step')})"
        )
    for name in ("forgetting", "safety"):
        check = evaluation.get(name)
        if check:
            verdict = "[yellow]clear drop[/]" if check["regressed"] else "no clear drop"
            console.print(
                f"{name} check: base {check['base']}/{check['n']}, fine-tuned {check['fine_tuned']}/{check['n']}"
                f" ({verdict}{'; ' + check['note'] if check['note'] else ''})"
            )


def _follow(client, job_id: str, console: Console):
    """Print events as they come and drive a progress bar from the metrics events."""
    seen: set[str] = set()
    with Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("train", total=None, loss="")
        while True:
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=100).data)
            for e in reversed(events):  # the API lists newest first
                if e.id in seen:
                    continue
                seen.add(e.id)
                if e.type == "metrics" and e.data:
                    loss = f"loss {e.data['train_loss']:.3f}"
                    if "valid_loss" in e.data:
                        loss += f"  valid {e.data['valid_loss']:.3f}"
                    progress.update(task, total=e.data["total_steps"], completed=e.data["step"], loss=loss)
                else:
                    progress.console.print(f"  [dim]{time.strftime('%H:%M:%S')}[/] {e.message}")
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


def run_demo(
    *, examples: Path, home: Path, hyperparameters: dict, console: Console, keep_serving: bool = False
) -> int:
    from openai import OpenAI

    files = {k: examples / f"tickets_{k}.jsonl" for k in ("train", "valid")}
    files["items"] = examples / "tickets_heldout_items.jsonl"
    files["eval"] = examples / "tickets_eval.json"
    for path in files.values():
        if not path.exists():
            console.print(f"[red]Missing {path}[/] (run from the repository root, or pass --examples)")
            return 2
    key = ids.api_key()  # the demo server's admin key (TUNEHOUSE_ADMIN_KEY)
    port = _free_port()
    console.rule("tunehouse demo")
    console.print(f"Starting a server on port {port} (home: {home}) …")
    server = _start_server(home, port, key, console)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=600)
        train = client.files.create(file=files["train"].open("rb"), purpose="fine-tune")
        valid = client.files.create(file=files["valid"].open("rb"), purpose="fine-tune")
        console.print(
            f"Uploaded {train.filename} ({train.bytes} B) as {train.id} and {valid.filename} as {valid.id}"
        )
        hyper = {
            k: v if v == "auto" else float(v) if k == "learning_rate_multiplier" else int(v)
            for k, v in hyperparameters.items()
        }
        t0 = time.time()
        eval_spec = json.loads(files["eval"].read_text())
        exact_json = eval_spec["eval"]["testing_criteria"][0]
        job = client.fine_tuning.jobs.create(
            model=DEFAULT_MODEL,
            training_file=train.id,
            validation_file=valid.id,
            suffix="tickets",
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
            # tunehouse extension: score every checkpoint and the base with the eval's grader on
            # the validation file, and make the best checkpoint the model.
            extra_body={"evaluation": {"grader": _plain_grader(exact_json), "select_checkpoint": "best"}},
        )
        console.print(f"Created job {job.id}")
        job = _follow(client, job.id, console)
        wall = time.time() - t0
        if job.status != "succeeded":
            console.print(f"[red]Job {job.status}:[/] {job.error.message if job.error else ''}")
            return 1
        console.print(
            f"[green]Fine-tuned model[/] {job.fine_tuned_model} in {wall:.0f} s "
            f"({job.trained_tokens} trained tokens, hyperparameters {job.hyperparameters.model_dump()})"
        )
        _print_evaluation(job.model_extra.get("evaluation") or {}, console)

        console.rule("held-out prompts: base vs fine-tuned, one eval run each (greedy)")
        heldout = [json.loads(line) for line in files["items"].read_text().splitlines() if line.strip()]
        ev = client.evals.create(**eval_spec["eval"])
        runs = {}
        for who, model in (("base", DEFAULT_MODEL), ("ft", job.fine_tuned_model)):
            data_source = {
                **eval_spec["run"]["data_source"],
                "model": model,
                "source": {"type": "file_content", "content": [{"item": item} for item in heldout]},
            }
            runs[who] = client.evals.runs.create(ev.id, name=who, data_source=data_source)
        for who, run in runs.items():
            while run.status not in ("completed", "failed", "canceled"):
                time.sleep(1.0)
                run = client.evals.runs.retrieve(run.id, eval_id=ev.id)
            runs[who] = run
        answers = {
            who: {
                item.datasource_item_id: item
                for item in client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)
            }
            for who, run in runs.items()
        }
        table = Table(show_lines=True)
        for col in ("ticket", "expected", DEFAULT_MODEL, "fine-tuned"):
            table.add_column(col, overflow="fold")
        for i, item in enumerate(heldout):
            row = [item["ticket"], item["reference"]]
            for who in ("base", "ft"):
                out = answers[who].get(i)
                row.append(out.sample.output[0].content if out and out.sample.output else "(no answer)")
            table.add_row(*row)
        console.print(table)
        n = len(heldout)
        names = criterion_names(
            list(runs.values()), [c["name"] for c in eval_spec["eval"]["testing_criteria"]]
        )
        passed = {
            who: {c.testing_criteria: c.passed for c in run.per_testing_criteria_results or []}
            for who, run in runs.items()
        }
        for criterion, name in names.items():
            console.print(
                f"{name}: base {passed['base'].get(criterion, 0)}/{n}, fine-tuned {passed['ft'].get(criterion, 0)}/{n}"
            )
        for who, run in runs.items():
            console.print(f"eval run {run.id} ({who}): {run.report_url}")
        console.print(f"fine-tune wall time (job created → succeeded): {wall:.0f} s")
        _print_dashboard(port, key, job.id, console)
        if keep_serving:
            console.print("The server keeps running for the dashboard; Ctrl-C stops it.")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
