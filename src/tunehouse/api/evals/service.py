"""Evals as the API sees them: evals (create, list, get, update, delete), their runs (create,
list, get, cancel, delete) and the runs' output items (list, get), each scoped to the caller's
project like files and jobs (tenancy.scope).

A run is checked whole when it is created (its data source, every item against the eval's
item_schema and templates, every model it names usable by the caller's project) and queued as a
job of kind "eval_run" with the run's id; the worker executes it (jobs/eval_run.py). Its status on
the wire is its job's: validating_files/queued/paused → queued, running → in_progress, succeeded →
completed, failed → failed, cancelled → canceled.

`report_url` is this server's own URL of the run (`<base URL the client called>/v1/evals/<eval>/runs/<run>`):
tunehouse has no dashboard page for runs, and the URL a client reached the server by is the one
that works for it (behind a proxy too, unlike the settings' bind host and port).
"""

from __future__ import annotations

import shutil

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.api.aliases.service import resolve_grader_models
from tunehouse.api.evals.protocol import (
    CreateEvalRequest,
    CreateEvalRunRequest,
    EvalApiError,
    EvalDeleted,
    EvalList,
    EvalRunDeleted,
    EvalRunList,
    EvalRunOutputItemList,
    UpdateEvalRequest,
)
from tunehouse.api.evals.protocol import Eval as WireEval
from tunehouse.api.evals.protocol import EvalRun as WireRun
from tunehouse.api.evals.protocol import EvalRunOutputItem as WireOutputItem
from tunehouse.api.files.service import get_file_row
from tunehouse.api.models.service import resolve_for_inference
from tunehouse.api.pagination import page
from tunehouse.api.state import AppState
from tunehouse.config import Settings
from tunehouse.errors import InvalidRequest, ModelNotFound, NotFound
from tunehouse.evals.definitions import (
    DataSourceConfig,
    graders_of,
    parse_data_source_config,
    parse_testing_criteria,
)
from tunehouse.evals.runs import summarize
from tunehouse.evals.sources import (
    check_lines,
    lines_from_content,
    lines_from_jsonl,
    parse_run_data_source,
    report,
)
from tunehouse.jobs.eval_run import EvalRunKind
from tunehouse.jobs.events import add_event
from tunehouse.jobs.queue import gpus_for
from tunehouse.store import files
from tunehouse.store import job_status as st
from tunehouse.store.tables import Eval, EvalOutputItem, EvalRun, Job, now, now_ms
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import scoped
from tunehouse.usage.quotas import check_concurrent_jobs, effective_quotas
from tunehouse.webhooks.outbox import EVAL_RUN_CANCELED, enqueue_job_event

WIRE_STATUS = {
    st.VALIDATING: "queued",
    st.QUEUED: "queued",
    st.PAUSED: "queued",
    st.RUNNING: "in_progress",
    st.SUCCEEDED: "completed",
    st.FAILED: "failed",
    st.CANCELLED: "canceled",
}
JOB_STATUSES = {
    wire: [job for job, w in WIRE_STATUS.items() if w == wire] for wire in set(WIRE_STATUS.values())
}
EVAL_FILE_PURPOSE = "evals"


# --------------------------------------------------------------------------------------------------
# Evals


def eval_to_wire(row: Eval) -> WireEval:
    return WireEval(
        id=row.id,
        name=row.name,
        data_source_config=DataSourceConfig.from_stored(row.data_source_config).wire(),
        testing_criteria=list(row.testing_criteria),
        created_at=row.created_at,
        metadata=row.metadata_,
    )


def get_eval_row(session: Session, *, principal: Principal, eval_id: str) -> Eval:
    row = session.scalar(scoped(Eval, principal).where(Eval.id == eval_id))
    if row is None:
        raise NotFound(f"Eval with id '{eval_id}' not found.", param="eval_id", code="eval_not_found")
    return row


def create_eval(
    session: Session,
    *,
    principal: Principal,
    req: CreateEvalRequest,
    settings: Settings,
    eval_id: str | None = None,
) -> WireEval:
    """`eval_id`: an id chosen by the caller (`tunehouse migrate` records it in the same commit)."""
    config = parse_data_source_config(req.data_source_config)
    # Model aliases in model graders become their models now: runs (the worker) use the models.
    testing_criteria = resolve_grader_models(
        settings, session, principal=principal, spec=req.testing_criteria, param="testing_criteria"
    )
    criteria = parse_testing_criteria(testing_criteria, config)
    eval_id = eval_id or ids.eval_id()
    created = now()
    row = Eval(
        id=eval_id,
        organization_id=principal.organization_id,
        project_id=principal.owning_project_id,
        name=req.name or eval_id,  # OpenAI's name is optional; ours defaults to the id
        data_source_config=config.stored(),
        testing_criteria=criteria,
        metadata_=req.metadata,
        created_at=created,
        updated_at=now_ms(),
    )
    session.add(row)
    session.commit()
    return eval_to_wire(row)


def list_evals(
    session: Session, *, principal: Principal, after: str | None, limit: int, order: str, order_by: str
) -> EvalList:
    stmt = scoped(Eval, principal)
    if order_by == "created_at":
        rows, has_more = page(session, stmt, Eval, after=after, limit=limit, descending=order == "desc")
    else:
        rows, has_more = _page_by_updated_at(
            session, stmt, after=after, limit=limit, descending=order == "desc"
        )
    data = [eval_to_wire(r) for r in rows]
    return EvalList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


def _page_by_updated_at(session: Session, stmt, *, after: str | None, limit: int, descending: bool):
    """Cursor pagination on (updated_at, seq): an eval updated after the cursor was handed out
    moves, as it does in OpenAI's list."""
    if after is not None:
        cursor = session.execute(
            stmt.with_only_columns(Eval.updated_at, Eval.seq).where(Eval.id == after)
        ).first()
        if cursor is None:
            raise InvalidRequest(f"Invalid 'after': no object with id '{after}' in this list.", param="after")
        if descending:
            stmt = stmt.where(
                or_(Eval.updated_at < cursor[0], and_(Eval.updated_at == cursor[0], Eval.seq < cursor[1]))
            )
        else:
            stmt = stmt.where(
                or_(Eval.updated_at > cursor[0], and_(Eval.updated_at == cursor[0], Eval.seq > cursor[1]))
            )
    keys = (Eval.updated_at.desc(), Eval.seq.desc()) if descending else (Eval.updated_at, Eval.seq)
    rows = list(session.scalars(stmt.order_by(*keys).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def update_eval(session: Session, *, principal: Principal, eval_id: str, req: UpdateEvalRequest) -> WireEval:
    row = get_eval_row(session, principal=principal, eval_id=eval_id)
    if req.name is not None:
        row.name = req.name
    if "metadata" in req.model_fields_set:
        row.metadata_ = req.metadata
    row.updated_at = now_ms()
    session.commit()
    return eval_to_wire(row)


def delete_eval(state: AppState, session: Session, *, principal: Principal, eval_id: str) -> EvalDeleted:
    row = get_eval_row(session, principal=principal, eval_id=eval_id)
    run_ids = list(session.scalars(select(EvalRun.id).where(EvalRun.eval_id == row.id)))
    _delete_runs(session, run_ids)
    session.delete(row)
    session.commit()
    _delete_work_dirs(state, run_ids)
    return EvalDeleted(deleted=True, eval_id=eval_id)


def _delete_runs(session: Session, run_ids: list[str]) -> None:
    """Runs, their output items and their jobs. A job still running loses its row: its worker
    stops the process at its next look (the job is no longer its own)."""
    if not run_ids:
        return
    session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id.in_(run_ids)))
    session.execute(delete(EvalRun).where(EvalRun.id.in_(run_ids)))
    session.execute(delete(Job).where(Job.id.in_(run_ids), Job.kind == EvalRunKind.name))


def _delete_work_dirs(state: AppState, run_ids: list[str]) -> None:
    for run_id in run_ids:  # the runner's logs
        shutil.rmtree(state.settings.jobs_dir / run_id, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Runs


def report_url(base_url: str, run: EvalRun) -> str:
    return f"{base_url.rstrip('/')}/v1/evals/{run.eval_id}/runs/{run.id}"


def run_to_wire(
    session: Session, run: EvalRun, job: Job | None, *, base_url: str, criteria: list[dict] | None = None
) -> WireRun:
    if run.result_counts is not None:
        summary = {
            "result_counts": run.result_counts,
            "per_model_usage": run.per_model_usage,
            "per_testing_criteria_results": run.per_testing_criteria_results,
        }
    else:
        if criteria is None:
            criteria = session.scalar(select(Eval.testing_criteria).where(Eval.id == run.eval_id)) or []
        summary = summarize(session, run.id, criteria)
    error = (job.error if job is not None else None) or None
    return WireRun(
        id=run.id,
        eval_id=run.eval_id,
        status=WIRE_STATUS.get(job.status, "failed") if job is not None else "failed",
        model=run.model,
        name=run.name,
        created_at=run.created_at,
        report_url=report_url(base_url, run),
        data_source=run.data_source,
        metadata=run.metadata_,
        error=EvalApiError(code=error.get("code") or "server_error", message=error.get("message") or "")
        if error
        else None,
        **summary,
    )


def _runs_of(principal: Principal, eval_id: str):
    return scoped(EvalRun, principal).where(EvalRun.eval_id == eval_id)


def get_run_rows(
    session: Session, *, principal: Principal, eval_id: str, run_id: str
) -> tuple[EvalRun, Job | None]:
    run = session.scalar(_runs_of(principal, eval_id).where(EvalRun.id == run_id))
    if run is None:
        raise NotFound(f"Eval run with id '{run_id}' not found.", param="run_id", code="eval_run_not_found")
    return run, session.scalar(select(Job).where(Job.id == run.id))


def _resolve(state: AppState, session: Session, principal: Principal, model: str, param: str):
    try:
        return resolve_for_inference(state, session, principal=principal, model=model)
    except ModelNotFound:
        raise ModelNotFound(model, param=param) from None
    except NotFound as e:  # an alias that leads nowhere now: its own message, this param
        e.param = param
        raise


def _read_lines(state: AppState, session: Session, principal: Principal, file_id: str):
    param = "data_source.source.id"
    try:
        row = get_file_row(session, principal=principal, file_id=file_id)
    except NotFound:
        raise NotFound(f"No such File object: {file_id}", param=param) from None
    if row.purpose != EVAL_FILE_PURPOSE:
        raise InvalidRequest(
            f"File {file_id} has purpose '{row.purpose}'; an eval run reads a file uploaded with "
            f"purpose '{EVAL_FILE_PURPOSE}'.",
            param=param,
            code="invalid_file_purpose",
        )
    path = files.file_path(state.files, row)
    if not path.exists():
        raise NotFound(f"No such File object: {file_id}", param=param)
    lines, problems = lines_from_jsonl(path.read_text(encoding="utf-8", errors="replace"))
    if problems:
        raise report(problems, param=param, what=f"the file {file_id}")
    return lines


def create_run(
    state: AppState,
    session: Session,
    *,
    principal: Principal,
    eval_id: str,
    req: CreateEvalRunRequest,
    base_url: str,
) -> WireRun:
    ev = get_eval_row(session, principal=principal, eval_id=eval_id)
    source = parse_run_data_source(req.data_source)
    config = DataSourceConfig.from_stored(ev.data_source_config)
    graders = graders_of(ev.testing_criteria)
    if source.file_id is not None:
        lines = _read_lines(state, session, principal, source.file_id)
        where = "data_source.source.id"
    else:
        lines = lines_from_content(source.source)
        where = None
    problems = check_lines(lines, source, config, graders)
    if problems:
        first = problems[0][0]
        param = where or f"data_source.source.content[{first.index}]"
        raise report(problems, param=param, what="the run's data source")
    # Every model the run samples, usable by the caller's project now (the worker does not check).
    refs = []
    if source.model is not None:
        refs.append(_resolve(state, session, principal, source.model, "data_source.model"))
        source.model = refs[0].name  # an alias's model: the worker runs the model itself
    for grader in graders:
        for model, param in grader.models().items():
            refs.append(_resolve(state, session, principal, model, param))
    check_concurrent_jobs(
        effective_quotas(state.settings, session, principal.organization_id),
        session,
        principal.organization_id,
    )
    gpus = max(
        (gpus_for(r.base_path, options=None, gpu_min_params=state.settings.gpu_min_params) for r in refs),
        default=0,
    )
    run_id = ids.eval_run_id()
    run = EvalRun(
        id=run_id,
        eval_id=ev.id,
        organization_id=ev.organization_id,
        project_id=ev.project_id,  # the eval's project, whoever starts the run
        name=req.name or source.model or run_id,
        model=source.model or "",
        data_source=source.wire(),
        metadata_=req.metadata,
        created_at=now(),
    )
    # The job that executes it: the queue's columns; those of fine-tuning hold neutral values.
    job = Job(
        id=run_id,
        kind=EvalRunKind.name,
        organization_id=ev.organization_id,
        project_id=ev.project_id,
        model=source.model or "",
        base_model=refs[0].name if source.model is not None else "",
        training_file=source.file_id or "",
        seed=int(source.sampling.get("seed", 0)),
        method={"type": EvalRunKind.name},
        status=st.QUEUED,
        result_files=[],
        gpus_required=gpus,
    )
    session.add(run)
    session.add(job)
    session.flush()
    add_event(session, run_id, f"Created eval run {run_id} of {ev.id} ({len(lines)} items)")
    session.commit()
    return run_to_wire(session, run, job, base_url=base_url, criteria=ev.testing_criteria)


def list_runs(
    session: Session,
    *,
    principal: Principal,
    eval_id: str,
    after: str | None,
    limit: int,
    order: str,
    status: str | None,
    base_url: str,
) -> EvalRunList:
    ev = get_eval_row(session, principal=principal, eval_id=eval_id)
    stmt = _runs_of(principal, eval_id)
    if status is not None:
        stmt = stmt.where(EvalRun.id.in_(select(Job.id).where(Job.status.in_(JOB_STATUSES[status]))))
    rows, has_more = page(session, stmt, EvalRun, after=after, limit=limit, descending=order == "desc")
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_([r.id for r in rows])))}
    data = [
        run_to_wire(session, r, jobs.get(r.id), base_url=base_url, criteria=ev.testing_criteria) for r in rows
    ]
    return EvalRunList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


def get_run(session: Session, *, principal: Principal, eval_id: str, run_id: str, base_url: str) -> WireRun:
    run, job = get_run_rows(session, principal=principal, eval_id=eval_id, run_id=run_id)
    return run_to_wire(session, run, job, base_url=base_url)


def cancel_run(
    session: Session, *, principal: Principal, eval_id: str, run_id: str, base_url: str
) -> WireRun:
    run, job = get_run_rows(session, principal=principal, eval_id=eval_id, run_id=run_id)
    if job is None or job.status in st.TERMINAL:
        status = WIRE_STATUS.get(job.status, "failed") if job is not None else "failed"
        raise InvalidRequest(
            f"Eval run {run_id} is already {status} and cannot be canceled.",
            param="run_id",
            code="run_not_cancelable",
        )
    # The worker notices within a poll and stops the run's process; written items stay.
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.notin_(st.TERMINAL))
        .values(status=st.CANCELLED, finished_at=now())
    )
    add_event(session, job.id, "Eval run canceled")
    enqueue_job_event(
        session, job_id=job.id, event_type=EVAL_RUN_CANCELED, organization_id=job.organization_id
    )
    session.commit()
    session.refresh(job)
    return run_to_wire(session, run, job, base_url=base_url)


def delete_run(
    state: AppState, session: Session, *, principal: Principal, eval_id: str, run_id: str
) -> EvalRunDeleted:
    run, _ = get_run_rows(session, principal=principal, eval_id=eval_id, run_id=run_id)
    _delete_runs(session, [run.id])
    session.commit()
    _delete_work_dirs(state, [run.id])
    return EvalRunDeleted(deleted=True, run_id=run_id)


# --------------------------------------------------------------------------------------------------
# Output items


def item_to_wire(row: EvalOutputItem) -> WireOutputItem:
    return WireOutputItem(
        id=row.id,
        run_id=row.run_id,
        eval_id=row.eval_id,
        created_at=row.created_at,
        status=row.status,
        datasource_item_id=row.datasource_item_id,
        datasource_item=row.datasource_item,
        results=list(row.results or []),
        sample=row.sample,
    )


def list_output_items(
    session: Session,
    *,
    principal: Principal,
    eval_id: str,
    run_id: str,
    after: str | None,
    limit: int,
    order: str,
    status: str | None,
) -> EvalRunOutputItemList:
    get_run_rows(session, principal=principal, eval_id=eval_id, run_id=run_id)
    stmt = select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
    if status is not None:
        stmt = stmt.where(EvalOutputItem.status == status)
    rows, has_more = page(session, stmt, EvalOutputItem, after=after, limit=limit, descending=order == "desc")
    data = [item_to_wire(r) for r in rows]
    return EvalRunOutputItemList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


def get_output_item(
    session: Session, *, principal: Principal, eval_id: str, run_id: str, output_item_id: str
) -> WireOutputItem:
    get_run_rows(session, principal=principal, eval_id=eval_id, run_id=run_id)
    row = session.scalar(
        select(EvalOutputItem).where(EvalOutputItem.run_id == run_id, EvalOutputItem.id == output_item_id)
    )
    if row is None:
        raise NotFound(
            f"Output item with id '{output_item_id}' not found.",
            param="output_item_id",
            code="output_item_not_found",
        )
    return item_to_wire(row)
