"""The status page (`/`) as HTML: the API's documents (status_api.py) for a person.

Server-rendered, one self-contained document: no CDN, no build step, no framework. The only
script refreshes the live part of the page in place every few seconds (a checkbox pauses it);
sorting, filtering and paging are links and a GET form, so the page works without it.

Everything shown that came from outside (subjects, components, rejected payloads, details) is
escaped; the Content-Security-Policy (CONTENT_SECURITY_POLICY) allows no script but the page's
own, so a payload that slipped through escaping still could not run.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable
from html import escape
from urllib.parse import quote, urlencode

from aggregator.exposition import status_api as api

REFRESH_SECONDS = 5
SUBJECTS_SHOWN = 200  # the page lists at most this many subjects; /api/v1/sources has them all
FRESH_REJECT_SECONDS = 300  # a subject's rejected payloads are shown unfolded this long after the last one

# (heading, sort key or None, hidden on a narrow screen)
WORKER_COLUMNS: tuple[tuple[str, str | None, bool], ...] = (
    ("Component", "component", False),
    ("Endpoint", "endpoint", False),
    ("Worker id", "worker_id", False),
    ("DP rank", "dp_rank", False),
    ("Source", "source", False),
    ("Discovery", None, True),
    ("Last message", "last_seen", False),
    ("KV used / total", "kv_usage", False),
    ("Slots", "slots_active", False),
    ("Waiting", "requests_waiting", False),
    ("Hit rate", "hit_rate", True),
    ("GPUs", "gpus", True),
    ("Expires", None, True),
)

_NUMERIC = {"Worker id", "DP rank", "Slots", "Waiting", "Hit rate", "GPUs"}

_SCRIPT = """
(() => {
  const box = document.getElementById("auto-refresh");
  const note = document.getElementById("refresh-note");
  const every = Number(document.body.dataset.refreshSeconds) * 1000;
  let timer = 0;
  box.checked = localStorage.getItem("status-refresh") !== "off";
  async function refresh() {
    try {
      const response = await fetch(location.href, {headers: {"Accept": "text/html"}, cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("live");
      const folded = new Map([...document.querySelectorAll("#live details[id]")].map(d => [d.id, d.open]));
      for (const details of fresh.querySelectorAll("details[id]")) {
        if (folded.has(details.id)) details.open = folded.get(details.id);
      }
      document.getElementById("live").replaceWith(document.adoptNode(fresh));
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || "0") + 1);
      note.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      note.textContent = "refresh failed (" + error.message + "); retrying";
    }
    schedule();
  }
  function schedule() {
    clearTimeout(timer);
    if (box.checked) timer = setTimeout(refresh, every);
  }
  box.addEventListener("change", () => {
    localStorage.setItem("status-refresh", box.checked ? "on" : "off");
    schedule();
  });
  schedule();
})();
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                           "base-uri 'none'")

_STYLE = """
:root { color-scheme: light dark; --line: #8884; --muted: #888; --bad: #c0392b; --good: #1e8449; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; padding: 0 12px 24px; }
header { display: flex; flex-wrap: wrap; gap: 4px 16px; align-items: baseline; padding: 8px 0;
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 18px; margin: 0; }
header nav a { margin-right: 10px; }
h2 { font-size: 16px; margin: 20px 0 8px; }
.muted { color: var(--muted); }
.bad { color: var(--bad); font-weight: 600; }
.good { color: var(--good); }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; min-width: 130px; flex: 1 1 130px; }
.card b { display: block; font-size: 18px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 5px; text-align: left; vertical-align: top;
  white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 12em; }
th a { color: inherit; }
meter { width: 56px; vertical-align: middle; }
pre { white-space: pre-wrap; word-break: break-all; margin: 2px 0; padding: 4px; border: 1px solid var(--line);
  max-height: 12em; overflow: auto; font-size: 12px; }
form.filters { display: flex; flex-wrap: wrap; gap: 6px; align-items: end; margin-bottom: 8px; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; }
form.filters input, form.filters select { font: inherit; padding: 2px 4px; max-width: 160px; }
.pager { margin: 6px 0; display: flex; flex-wrap: wrap; gap: 8px; }
details summary { cursor: pointer; }
ol.rejects { margin: 4px 0; padding-left: 20px; }
@media (max-width: 640px) {
  body { font-size: 13px; padding: 0 6px 16px; }
  .card { min-width: 100px; }
  /* The long tables as one block per row, each value under its column's name. */
  table.stack thead { display: none; }
  table.stack tr { display: block; border-bottom: 1px solid var(--line); padding: 4px 0; }
  table.stack td { display: flex; justify-content: space-between; gap: 12px; border: 0; padding: 1px 4px;
    white-space: normal; text-align: right; min-width: 0; overflow-wrap: anywhere; }
  table.stack td::before { content: attr(data-label); color: var(--muted); text-align: left; white-space: nowrap; }
  table.stack td[colspan] { display: block; text-align: left; }
  table.stack .wide { display: none; }
}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _int(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} %"


def _float(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def duration(seconds: float) -> str:
    """A duration as a person reads it: 0.4 s, 12 s, 3 m 05 s, 2 h 01 m, 3 d 04 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} m {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} m"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _ago(at: float | None, age: float | None) -> str:
    if at is None or age is None:
        return '<span class="muted">never</span>'
    return f'<time datetime="{_e(_utc(at))}" title="{_e(_utc(at))}">{_e(duration(age))} ago</time>'


def _reason(reason: str, reasons: dict[str, str]) -> str:
    return f'<abbr title="{_e(reasons.get(reason, ""))}">{_e(reason)}</abbr>'


def _by_reason(by_reason: dict[str, int], reasons: dict[str, str]) -> str:
    if not by_reason:
        return ""
    return ", ".join(f'{_reason(reason, reasons)}: <span class="bad">{count:,}</span>'
                     for reason, count in by_reason.items())


def _query(current: api.WorkersPage, **changes: object) -> str:
    """The page's own query string with `changes` (None removes a parameter), defaults left out."""
    filters = current.filters
    params: dict[str, object] = {
        "component": filters.component, "endpoint": filters.endpoint, "source": filters.source, "q": filters.q,
        "sort": current.sort, "order": current.order, "page": current.page, "page_size": current.page_size,
    }
    params.update(changes)
    defaults = {"sort": "key", "order": "asc", "page": 1, "page_size": 100}
    kept = {name: value for name, value in params.items() if value is not None and defaults.get(name) != value}
    return "?" + urlencode(kept) if kept else "?"


def _worker_path(worker: api.Worker) -> str:
    parts = (worker.component, worker.endpoint, str(worker.worker_id), str(worker.dp_rank))
    return "api/v1/workers/" + "/".join(quote(part, safe="") for part in parts)


# -- sections -------------------------------------------------------------------------------


def _summary(summary: api.Summary) -> str:
    nats = summary.nats
    nats_state = ('<b class="good">connected</b>' if nats.connected and nats.subscribed
                  else '<b class="bad">connected, not subscribed</b>' if nats.connected
                  else '<b class="bad">disconnected</b>')
    kv = (f'<meter min="0" max="{summary.kv_blocks_total}" value="{summary.kv_blocks_active}"></meter> '
          if summary.kv_blocks_total else "")
    rejected = summary.messages_rejected
    cards = [
        ("Live workers", f"<b>{summary.workers:,}</b> of at most {summary.max_workers:,}"),
        ("Component endpoints", f"<b>{len(summary.groups):,}</b>"),
        ("KV blocks used", f"<b>{_percent(summary.kv_usage_percent)}</b> {kv}"
                           f"{_int(summary.kv_blocks_active)} / {_int(summary.kv_blocks_total)}"),
        ("KV hit rate", f"<b>{_percent(summary.hit_rate_percent)}</b> cumulative"),
        ("GPUs", f"<b>{summary.gpus:,}</b>"),
        ("Messages", f"<b>{summary.messages_accepted:,}</b> accepted of {summary.messages_received:,}; "
                     + (f'<span class="bad">{rejected:,} rejected</span>' if rejected else "none rejected")),
        ("NATS", nats_state),
        ("Expiry", f"<b>{duration(summary.stale_after_seconds)}</b> of silence"),
    ]
    out = ['<section id="summary"><h2>Fleet</h2><div class="cards">']
    out += [f'<div class="card"><span class="muted">{_e(title)}</span>{body}</div>' for title, body in cards]
    out.append("</div>")
    out.append('<div class="scroll"><table id="groups"><thead><tr><th>Component</th><th>Endpoint</th>'
               '<th class="num">Workers</th><th class="num">Load avg</th><th class="num">Load std</th>'
               '<th>KV blocks used / total</th><th class="num">Hit rate</th><th class="num">GPUs</th>'
               '<th class="num">Expired</th></tr></thead><tbody>')
    for group in summary.groups:
        out.append(
            f'<tr data-group="{_e(group.component)}/{_e(group.endpoint)}"><td>{_e(group.component)}</td>'
            f"<td>{_e(group.endpoint)}</td><td class=\"num\">{group.workers:,}</td>"
            f'<td class="num">{_float(group.load_avg)}</td><td class="num">{_float(group.load_std)}</td>'
            f"<td>{_kv(group.kv_blocks_active, group.kv_blocks_total, group.kv_usage_percent, percent=True)}</td>"
            f'<td class="num">{_percent(group.hit_rate_percent)}</td><td class="num">{group.gpus:,}</td>'
            f'<td class="num">{group.expired:,}</td></tr>')
    if not summary.groups:
        out.append('<tr><td colspan="9" class="muted">No worker has reported yet.</td></tr>')
    out.append("</tbody></table></div></section>")
    return "".join(out)


def _kv(active: int | None, total: int | None, usage: float | None, *, percent: bool = False) -> str:
    """A bar and the blocks used of the total; the percentage shown, or on hover only."""
    if active is None or total is None or not (active or total):
        return '<span class="muted">–</span>'
    meter = (f'<meter min="0" max="{total}" value="{active}" title="{_e(_percent(usage))}"></meter> '
             if total else "")
    shown = f" ({_percent(usage)})" if percent else ""
    return f'{meter}<span title="{_e(_percent(usage))}">{active:,} / {total:,}</span>{shown}'



def _filters(page: api.WorkersPage, summary: api.Summary) -> str:
    """The filter form: outside the refreshed part, so a refresh never eats what is being typed."""
    filters = page.filters
    components = sorted({g.component for g in summary.groups})
    endpoints = sorted({g.endpoint for g in summary.groups})

    def field(name: str, label: str, value: str | None, options: list[str] | None = None) -> str:
        listed = f' list="{name}-options"' if options is not None else ""
        html = (f'<label>{_e(label)}<input name="{name}" value="{_e(value or "")}"{listed} '
                f'autocomplete="off"></label>')
        if options is not None:
            html += f'<datalist id="{name}-options">' + "".join(
                f'<option value="{_e(option)}"></option>' for option in options[:500]) + "</datalist>"
        return html

    sizes = "".join(f'<option{" selected" if size == page.page_size else ""}>{size}</option>'
                    for size in sorted({25, 100, 500, 1000, page.page_size}))
    keys = [("Identity", "key")] + [(heading, key) for heading, key, _ in WORKER_COLUMNS if key is not None]
    sorts = "".join(f'<option value="{_e(key)}"{" selected" if key == page.sort else ""}>{_e(label)}</option>'
                    for label, key in keys)
    orders = "".join(f'<option value="{order}"{" selected" if order == page.order else ""}>{label}</option>'
                     for order, label in (("asc", "ascending"), ("desc", "descending")))
    return (
        '<form class="filters" method="get" action="">'
        + field("component", "Component", filters.component, components)
        + field("endpoint", "Endpoint", filters.endpoint, endpoints)
        + field("source", "Source", filters.source, ["nats", "pull", "journal"])
        + field("q", "Search (component, endpoint, id)", filters.q)
        + f'<label>Per page<select name="page_size">{sizes}</select></label>'
        + f'<label>Sort by<select name="sort">{sorts}</select></label>'
        + f'<label>Order<select name="order">{orders}</select></label>'
        + '<button type="submit">Filter</button> <a href="?">Clear</a></form>')


def _workers(page: api.WorkersPage) -> str:
    out = [f'<section id="workers"><h2>Workers <span class="muted">{page.matched:,} matching, of {page.total:,} live'
           f"</span></h2>", _pager(page)]
    out.append('<div class="scroll"><table id="workers-table" class="stack"><thead><tr>')
    for heading, key, wide in WORKER_COLUMNS:
        narrow = ' class="wide"' if wide else ""
        if key is None:
            out.append(f"<th{narrow}>{_e(heading)}</th>")
            continue
        current = page.sort == key
        order = "desc" if current and page.order == "asc" else "asc"
        arrow = (" ▲" if page.order == "asc" else " ▼") if current else ""
        aria = f' aria-sort="{"ascending" if page.order == "asc" else "descending"}"' if current else ""
        out.append(f'<th{narrow}{aria}><a href="{_e(_query(page, sort=key, order=order, page=None))}">'
                   f"{_e(heading)}{arrow}</a></th>")
    out.append("</tr></thead><tbody>")
    for worker in page.workers:
        out.append(_worker_row(worker))
    if not page.workers:
        text = "No worker matches the filters." if page.matched == 0 and page.total else (
            "No worker on this page." if page.total else "No worker has reported yet.")
        out.append(f'<tr><td colspan="{len(WORKER_COLUMNS)}" class="muted">{text}</td></tr>')
    out.append("</tbody></table></div>")
    out.append(_pager(page))
    out.append("</section>")
    return "".join(out)


def _row(attrs: str, cells: Iterable[tuple[str, str, str]]) -> str:
    """A table row of (label, css class, html) cells; the label heads the cell on a narrow screen."""
    return f"<tr {attrs}>" + "".join(
        f'<td data-label="{_e(label)}"' + (f' class="{css}"' if css else "") + f">{html}</td>"
        for label, css, html in cells) + "</tr>"


def _worker_row(worker: api.Worker) -> str:
    ident = f"{worker.component}/{worker.endpoint}/{worker.worker_id}/{worker.dp_rank}"
    slots = "–" if worker.slots_active is None else f"{worker.slots_active:,} / {_int(worker.slots_total)}"
    none = '<span class="muted">–</span>'
    cells = (
        _e(worker.component),
        _e(worker.endpoint),
        f'<a href="{_e(_worker_path(worker))}" title="hex {worker.worker_id:x}">{worker.worker_id}</a>',
        str(worker.dp_rank),
        _e(worker.source) if worker.source is not None else none,
        _e(worker.discovery) if worker.discovery is not None else none,
        _ago(worker.last_seen, worker.age_seconds),
        _kv(worker.kv_blocks_active, worker.kv_blocks_total, worker.kv_usage_percent),
        slots,
        _int(worker.requests_waiting),
        _percent(worker.hit_rate_percent),
        f"{worker.gpus:,}",
        f"in {_e(duration(worker.expires_in_seconds))}",
    )
    return _row(f'data-worker="{_e(ident)}"', (
        (heading, " ".join(c for c in ("num" if heading in _NUMERIC else "", "wide" if wide else "") if c), html)
        for (heading, _, wide), html in zip(WORKER_COLUMNS, cells, strict=True)))


def _pager(page: api.WorkersPage) -> str:
    def link(label: str, number: int, enabled: bool) -> str:
        if not enabled:
            return f'<span class="muted">{_e(label)}</span>'
        return f'<a href="{_e(_query(page, page=number))}" rel="{_e(label.lower())}">{_e(label)}</a>'

    first_row = (page.page - 1) * page.page_size + 1 if page.workers else 0
    last_row = first_row + len(page.workers) - 1 if page.workers else 0
    return (f'<nav class="pager" aria-label="pages">{link("First", 1, page.page > 1)}'
            f"{link('Previous', page.page - 1, page.page > 1)}"
            f'<span class="page-of">page {page.page:,} of {page.pages:,}</span>'
            f'<span class="muted">rows {first_row:,}–{last_row:,}</span>'
            f"{link('Next', page.page + 1, page.page < page.pages)}"
            f"{link('Last', page.pages, page.page < page.pages)}</nav>")


def _details_id(subject: api.SubjectCounts) -> str:
    digest = hashlib.sha1(f"{subject.source}\0{subject.subject}".encode(), usedforsecurity=False).hexdigest()
    return f"rejects-{digest[:16]}"


def _sources(sources: api.Sources) -> str:
    reasons = sources.reasons
    out = ['<section id="sources"><h2>Messages by source and kind</h2><div class="scroll">'
           '<table id="kinds"><thead><tr><th>Source</th><th>Kind</th><th class="num">Received</th>'
           '<th class="num">Accepted</th><th class="num">Rejected</th><th>By reason</th></tr></thead><tbody>']
    for kind in sources.kinds:
        out.append(f'<tr data-kind="{_e(kind.source)}/{_e(kind.kind)}"><td>{_e(kind.source)}</td>'
                   f"<td>{_e(kind.kind)}</td><td class=\"num\">{kind.received:,}</td>"
                   f'<td class="num">{kind.accepted:,}</td><td class="num">{kind.rejected:,}</td>'
                   f'<td class="wrap">{_by_reason(kind.rejected_by_reason, reasons)}</td></tr>')
    out.append("</tbody></table></div>")

    # Subjects with rejects first (the latest first), then the rest by source and subject.
    subjects = sorted(sources.subjects, key=lambda s: (
        0 if s.last_rejected else 1, -(s.last_rejected[0].at if s.last_rejected else 0.0), s.source, s.subject))
    shown = subjects[:SUBJECTS_SHOWN]
    out.append('<h2>Subjects</h2><p class="muted">Each exact subject a source received messages on; a subject '
               "with rejected messages comes first, with its last rejected payloads (truncated).</p>"
               '<div class="scroll"><table id="subjects" class="stack"><thead><tr><th>Source</th><th>Subject</th><th>Kind</th>'
               '<th class="num">Received</th><th class="num">Accepted</th><th class="num">Rejected</th>'
               "<th>By reason</th><th>Last message</th></tr></thead><tbody>")
    for subject in shown:
        out.append(_row(f'data-subject="{_e(subject.source)}/{_e(subject.subject)}"', (
            ("Source", "", _e(subject.source)),
            ("Subject", "wrap", _e(subject.subject)),
            ("Kind", "", _e(subject.kind)),
            ("Received", "num", f"{subject.received:,}"),
            ("Accepted", "num", f"{subject.accepted:,}"),
            ("Rejected", "num", f"{subject.rejected:,}"),
            ("By reason", "wrap", _by_reason(subject.rejected_by_reason, reasons)),
            ("Last message", "", _ago(subject.last_seen, subject.age_seconds)))))
        if subject.last_rejected:
            out.append(f'<tr class="rejects-row"><td colspan="8">{_rejected(subject, reasons)}</td></tr>')
    if not subjects:
        out.append('<tr><td colspan="8" class="muted">No message received yet.</td></tr>')
    out.append("</tbody></table></div>")
    if len(subjects) > len(shown):
        out.append(f'<p class="muted">{len(subjects) - len(shown):,} more subjects: '
                   '<a href="api/v1/sources">api/v1/sources</a> lists them all.</p>')
    out.append("</section>")
    return "".join(out)


def _rejected(subject: api.SubjectCounts, reasons: dict[str, str]) -> str:
    latest = subject.last_rejected[0]
    unfolded = " open" if latest.age_seconds < FRESH_REJECT_SECONDS else ""
    out = [f'<details id="{_details_id(subject)}" class="rejects"{unfolded}><summary>Last '
           f"{len(subject.last_rejected)} rejected on <code>{_e(subject.subject)}</code>, newest first</summary>"
           '<ol class="rejects">']
    for message in subject.last_rejected:
        size = (f"first {len(message.payload.encode()):,} of {message.payload_bytes:,} bytes"
                if message.truncated else f"{message.payload_bytes:,} bytes")
        out.append(f'<li data-reason="{_e(message.reason)}">{_ago(message.at, message.age_seconds)}: '
                   f"<b>{_reason(message.reason, reasons)}</b> — {_e(message.detail)} "
                   f'<span class="muted">({size})</span><pre>{_e(message.payload)}</pre></li>')
    out.append("</ol></details>")
    return "".join(out)


def _publishers(publishers: list[api.Publisher]) -> str:
    out = ['<section id="publishers"><h2>Event-plane publishers</h2>']
    if not publishers:
        out.append('<p class="muted">None. Publishers of the Dynamo 1.x event plane (NATS or ZMQ) are listed here '
                   "with their sequence gaps and restarts once the aggregator reads the event plane.</p></section>")
        return "".join(out)
    out.append('<div class="scroll"><table id="publishers-table"><thead><tr><th>Source</th><th>Publisher</th>'
               '<th>Topic</th><th>Worker</th><th class="num">Last sequence</th><th class="num">Gaps</th>'
               '<th class="num">Restarts</th><th>Last event</th></tr></thead><tbody>')
    for publisher in publishers:
        worker = ("–" if publisher.worker_id is None
                  else f"{publisher.worker_id}/{publisher.dp_rank if publisher.dp_rank is not None else 0}")
        gaps = f'<span class="bad">{publisher.gaps:,}</span>' if publisher.gaps else "0"
        out.append(f"<tr><td>{_e(publisher.source)}</td><td>{publisher.publisher_id}</td>"
                   f'<td class="wrap">{_e(publisher.topic)}</td><td>{_e(worker)}</td>'
                   f'<td class="num">{publisher.last_sequence:,}</td><td class="num">{gaps}</td>'
                   f'<td class="num">{publisher.restarts:,}</td>'
                   f"<td>{_ago(publisher.last_seen, publisher.age_seconds)}</td></tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


def _connections(nats: api.NatsConnection, discovery: dict[str, object] | None) -> str:
    state = ("connected and subscribed" if nats.connected and nats.subscribed
             else "connected, not subscribed yet" if nats.connected else "disconnected")
    css = "good" if nats.connected and nats.subscribed else "bad"
    rows: list[tuple[str, str]] = [
        ("State", f'<span class="{css}" id="nats-state">{_e(state)}</span>'),
        ("Server", _e(nats.server) if nats.server else '<span class="muted">–</span>'),
        ("Configured servers", _e(", ".join(nats.servers))),
        ("Reconnects", f"{nats.reconnects:,}"),
        ("Messages in", f"{nats.messages_in:,} ({nats.bytes_in:,} bytes)"),
    ]
    discovery_rows = (list(discovery.items()) if discovery else [])
    out = ['<section id="connections"><h2>Connections</h2><div class="scroll"><table id="nats"><thead><tr>'
           '<th colspan="2">NATS</th></tr></thead><tbody>']
    out += [f"<tr><td>{_e(name)}</td><td class=\"wrap\">{value}</td></tr>" for name, value in rows]
    out.append('</tbody></table><table id="discovery"><thead><tr><th colspan="2">Discovery</th></tr></thead><tbody>')
    if discovery_rows:
        out += [f"<tr><td>{_e(name)}</td><td class=\"wrap\">{_e(value)}</td></tr>" for name, value in discovery_rows]
    else:
        out.append('<tr><td colspan="2" class="muted">Not read: workers are known from the messages they '
                   "send.</td></tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


# -- documents ------------------------------------------------------------------------------------


def render_page(summary: api.Summary, workers: api.WorkersPage, sources: api.Sources,
                *, refresh_seconds: int = REFRESH_SECONDS) -> bytes:
    parts: Iterable[str] = (
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Fleet status · LLM aggregator</title>",
        f"<style>{_STYLE}</style></head>",
        f'<body data-refresh-seconds="{refresh_seconds}" data-refreshes="0">',
        '<header><h1>Fleet status</h1><nav><a href="metrics">/metrics</a><a href="api/v1/summary">summary</a>'
        '<a href="api/v1/workers">workers</a><a href="api/v1/sources">sources</a><a href="health">health</a></nav>',
        f'<label><input type="checkbox" id="auto-refresh" checked> refresh every {refresh_seconds} s</label>',
        f'<span class="muted" id="refresh-note">generated {_e(_utc(summary.generated_at))}</span></header>',
        _filters(workers, summary),
        '<main id="live">',
        f'<p class="muted" id="generated">Generated {_e(_utc(summary.generated_at))}; uptime '
        f"{_e(duration(summary.uptime_seconds))}.</p>",
        _summary(summary),
        _workers(workers),
        _sources(sources),
        _publishers(sources.publishers),
        _connections(sources.nats, sources.discovery),
        "</main>",
        f"<script>{_SCRIPT}</script></body></html>",
    )
    return "".join(parts).encode()


def render_error(status: int, message: str) -> bytes:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{status} · Fleet status</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>Fleet status</h1></header><p class="bad" id="error">{_e(message)}</p>'
        '<p><a href="?">Back to the status page</a></p></body></html>'
    ).encode()
