"""`tunehouse usage`, `tunehouse quotas …` and `tunehouse webhooks …`: read and manage the
database of a home directly (like `tunehouse keys`), on the machine that runs the server."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
quotas_app = typer.Typer(no_args_is_help=True, help="Quotas per organization and rate limits per key.")
webhooks_app = typer.Typer(
    no_args_is_help=True, help="Webhook endpoints for fine-tuning job, eval run and batch events."
)

HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="State folder (default: TUNEHOUSE_HOME or a per-user data dir).")
]
OrgOpt = Annotated[str, typer.Option("--org", help="Organization name, slug or id.")]


def _db(home: Path | None):
    from tunehouse.config import Settings
    from tunehouse.store.engine import Database, migrate

    settings = Settings(home=home) if home is not None else Settings()
    settings.ensure_dirs()
    migrate(settings.db_url)
    return settings, Database(settings.db_url)


def _org(session, org: str):
    from sqlalchemy import or_, select

    from tunehouse.store.tables import Organization

    row = session.scalar(
        select(Organization).where(
            or_(Organization.name == org, Organization.slug == org, Organization.id == org)
        )
    )
    if row is None:
        raise typer.BadParameter(f"no organization named {org!r}", param_hint="--org")
    return row


def _money(v: float) -> str:
    return f"${v:,.4f}"


def usage_cmd(
    org: Annotated[
        str | None, typer.Option("--org", help="Only this organization (name, slug or id).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="The last N UTC days, today included.")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: HomeOpt = None,
) -> None:
    """Tokens and cost per day, organization, model and kind (training or inference)."""
    from sqlalchemy import func, select

    from tunehouse.store.tables import Organization, UsageRecord
    from tunehouse.usage.records import utc_day

    _, db = _db(home)
    start = utc_day() - dt.timedelta(days=days - 1)
    with db.session() as s:
        stmt = (
            select(
                UsageRecord.day,
                Organization.name,
                UsageRecord.model,
                UsageRecord.kind,
                *(
                    func.sum(getattr(UsageRecord, c)).label(c)
                    for c in ("input_tokens", "output_tokens", "training_tokens", "requests", "cost")
                ),
            )
            .join(Organization, Organization.id == UsageRecord.organization_id)
            .where(UsageRecord.day >= start)
            .group_by(UsageRecord.day, Organization.name, UsageRecord.model, UsageRecord.kind)
            .order_by(UsageRecord.day, Organization.name, UsageRecord.model, UsageRecord.kind)
        )
        if org is not None:
            stmt = stmt.where(UsageRecord.organization_id == _org(s, org).id)
        rows = [r._asdict() for r in s.execute(stmt)]
    db.dispose()
    for r in rows:
        r["day"] = r["day"].isoformat()
        r["organization"] = r.pop("name")
        for c in ("input_tokens", "output_tokens", "training_tokens", "requests"):
            r[c] = int(r[c] or 0)  # PostgreSQL sums integers as decimals
        r["cost"] = round(float(r["cost"] or 0), 10)
    if as_json:
        typer.echo(json.dumps({"since": start.isoformat(), "data": rows}, indent=2))
        return
    table = Table(title=f"Usage since {start.isoformat()} (UTC)")
    for col in ("day", "organization", "model", "kind", "input", "output", "training", "requests", "cost"):
        table.add_column(
            col, justify="right" if col in ("input", "output", "training", "requests", "cost") else "left"
        )
    for r in rows:
        table.add_row(
            r["day"],
            r["organization"],
            r["model"],
            r["kind"],
            f"{r['input_tokens']:,}",
            f"{r['output_tokens']:,}",
            f"{r['training_tokens']:,}",
            f"{r['requests']:,}",
            _money(r["cost"]),
        )
    if rows:
        table.add_section()
        table.add_row("total", "", "", "", "", "", "", "", _money(sum(r["cost"] for r in rows)))
    console.print(table if rows else f"No usage since {start.isoformat()}.")


# --- quotas ----------------------------------------------------------------------------------------


def _limit(value: str | None, name: str) -> int | None | str:
    """A CLI quota value: a number, `unlimited` (-1) or `default` (inherit the settings)."""
    if value is None:
        return "keep"
    v = value.strip().lower().replace("_", "").replace(",", "")
    if v == "default":
        return None
    if v == "unlimited":
        return -1
    try:
        n = int(v)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: a number, 'unlimited' or 'default'", param_hint=name) from None
    if n < 0:
        raise typer.BadParameter("must be ≥ 0 ('unlimited' for no limit)", param_hint=name)
    return n


QuotaOpt = Annotated[
    str | None, typer.Option(help="A number, 'unlimited', or 'default' (the server's setting).")
]


@quotas_app.command("set")
def quotas_set(
    org: OrgOpt,
    free_training_tokens_per_day: QuotaOpt = None,
    max_training_tokens_per_day: QuotaOpt = None,
    max_concurrent_jobs: QuotaOpt = None,
    max_storage_bytes: QuotaOpt = None,
    requests_per_minute: QuotaOpt = None,
    tokens_per_minute: QuotaOpt = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Set the rate limits of this key id (key_…) instead.")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Override an organization's quotas (or one key's rate limits); options left out stay as they are."""
    from sqlalchemy import select

    from tunehouse.store.tables import ApiKey, ApiKeyRateLimit, now
    from tunehouse.usage.quotas import set_overrides

    given = {
        "free_training_tokens_per_day": _limit(
            free_training_tokens_per_day, "--free-training-tokens-per-day"
        ),
        "max_training_tokens_per_day": _limit(max_training_tokens_per_day, "--max-training-tokens-per-day"),
        "max_concurrent_jobs": _limit(max_concurrent_jobs, "--max-concurrent-jobs"),
        "max_storage_bytes": _limit(max_storage_bytes, "--max-storage-bytes"),
        "requests_per_minute": _limit(requests_per_minute, "--requests-per-minute"),
        "tokens_per_minute": _limit(tokens_per_minute, "--tokens-per-minute"),
    }
    changes = {k: v for k, v in given.items() if v != "keep"}
    if not changes:
        raise typer.BadParameter("give at least one quota to set")
    _, db = _db(home)
    with db.transaction() as s:
        organization = _org(s, org)
        if key is None:
            result = set_overrides(s, organization.id, changes)
        else:
            extra = set(changes) - {"requests_per_minute", "tokens_per_minute"}
            if extra:
                raise typer.BadParameter(f"a key has rate limits only, not {', '.join(sorted(extra))}")
            if (
                s.scalar(select(ApiKey.id).where(ApiKey.id == key, ApiKey.organization_id == organization.id))
                is None
            ):
                raise typer.BadParameter(f"no key {key!r} in organization {org!r}", param_hint="--key")
            row = s.get(ApiKeyRateLimit, key) or ApiKeyRateLimit(key_id=key, organization_id=organization.id)
            for f, v in changes.items():
                setattr(row, f, v)
            row.updated_at = now()
            s.add(row)
            result = {
                "key_id": key,
                "requests_per_minute": row.requests_per_minute,
                "tokens_per_minute": row.tokens_per_minute,
            }
    db.dispose()
    typer.echo(json.dumps(result, indent=2))


@quotas_app.command("show")
def quotas_show(
    org: Annotated[str | None, typer.Option("--org", help="Only this organization.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: HomeOpt = None,
) -> None:
    """Effective quotas (overrides marked *), and current use, per organization."""
    from sqlalchemy import select

    from tunehouse.store.tables import Organization
    from tunehouse.usage.quotas import effective_quotas, overrides, usage_summary

    settings, db = _db(home)
    out = []
    with db.session() as s:
        orgs = [_org(s, org)] if org else list(s.scalars(select(Organization).order_by(Organization.seq)))
        for o in orgs:
            out.append(
                {
                    "organization": o.name,
                    "organization_id": o.id,
                    "quotas": effective_quotas(settings, s, o.id).to_dict(),
                    "overrides": overrides(s, o.id),
                    "usage": usage_summary(settings, s, o.id),
                }
            )
    db.dispose()
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for o in out:
        table = Table(title=f"{o['organization']} ({o['organization_id']})")
        table.add_column("quota")
        table.add_column("limit", justify="right")
        table.add_column("in use", justify="right")
        use = o["usage"]
        in_use = {
            "max_training_tokens_per_day": f"{use['training_tokens_today'] + use['training_tokens_reserved']:,}",
            "free_training_tokens_per_day": f"{use['training_tokens_today']:,}",
            "max_concurrent_jobs": f"{use['concurrent_jobs']:,}",
            "max_storage_bytes": f"{use['storage_bytes']:,}",
        }
        for name, value in o["quotas"].items():
            mark = " *" if o["overrides"].get(name) is not None else ""
            table.add_row(name, ("unlimited" if value is None else f"{value:,}") + mark, in_use.get(name, ""))
        console.print(table)
    if not out:
        console.print("No organizations yet.")


# --- webhooks --------------------------------------------------------------------------------------


@webhooks_app.command("add")
def webhooks_add(
    org: OrgOpt,
    url: Annotated[str, typer.Option("--url", help="Where events are POSTed.")],
    event: Annotated[
        list[str] | None,
        typer.Option(
            "--event",
            help="fine_tuning.job.succeeded|failed|cancelled, eval.run.succeeded|failed|canceled, "
            "batch.completed|failed|cancelled|expired (repeatable; default: all).",
        ),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Add an endpoint and print it with its signing secret (shown this once)."""
    from tunehouse.errors import APIError
    from tunehouse.webhooks.outbox import add_endpoint, endpoint_dict

    _, db = _db(home)
    try:
        with db.transaction() as s:
            row = add_endpoint(s, organization_id=_org(s, org).id, url=url, events=event)
            out = endpoint_dict(row, with_secret=True)
    except APIError as e:
        raise typer.BadParameter(e.message) from None
    finally:
        db.dispose()
    typer.echo(json.dumps(out, indent=2))


@webhooks_app.command("list")
def webhooks_list(org: OrgOpt, home: HomeOpt = None) -> None:
    """The organization's endpoints (secrets are not shown again)."""
    from tunehouse.webhooks.outbox import endpoint_dict, list_endpoints

    _, db = _db(home)
    with db.session() as s:
        out = [endpoint_dict(r) for r in list_endpoints(s, organization_id=_org(s, org).id)]
    db.dispose()
    typer.echo(json.dumps(out, indent=2))


@webhooks_app.command("remove")
def webhooks_remove(
    endpoint_id: Annotated[str, typer.Argument(help="The endpoint's id (whep_…).")],
    org: OrgOpt,
    home: HomeOpt = None,
) -> None:
    """Remove an endpoint and its pending deliveries."""
    from tunehouse.errors import APIError
    from tunehouse.webhooks.outbox import remove_endpoint

    _, db = _db(home)
    try:
        with db.transaction() as s:
            remove_endpoint(s, organization_id=_org(s, org).id, endpoint_id=endpoint_id)
    except APIError as e:
        raise typer.BadParameter(e.message) from None
    finally:
        db.dispose()
    typer.echo(f"Removed {endpoint_id}.")
