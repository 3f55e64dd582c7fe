"""Writes the Grafana dashboards in deploy/grafana/dashboards/ (run: python3 deploy/grafana/generate.py).

Built with Grafana's own SDK, grafana-foundation-sdk, pinned in the `dashboards` extra
(`pip install -e '.[dashboards]'`). Its builds follow Grafana minor versions; there is none for
Grafana 12 (compose.yml runs 12.2) other than the moving "next" build, so the pin is the
newest 11.6 build, whose dashboard schema (v1, schemaVersion 41) Grafana 12 reads as it is.
Only this script needs the SDK; the committed JSON is what Grafana loads.

The dashboards are generated rather than hand-edited so that every panel names the
provisioned datasource, uses the template variables the same way and gets a unique id;
tests/integration/test_stack.py checks the committed JSON is exactly this script's output and runs
every query in it against a real Prometheus. Edit here, regenerate, commit both.

Template variables. The aggregator's series carry no Dynamo namespace label (one aggregator
serves one namespace); Prometheus adds `namespace` as a target label of the `aggregator`
scrape job (deploy/prometheus.yml), so every series the aggregator exports, llm_*, DCGM_*,
dynamo_component_* and llm_aggregator_*, is filtered by `namespace="$namespace"`. That
filter also keeps dcgm-exporter's own node-level series (job dcgm-exporter, no namespace)
out of the GPU dashboard, which shows the aggregator's per-worker copies. `$component`,
`$endpoint` and `$worker` are multi-value with an "All" of `.*`, so they are matched
with `=~`. On the Components dashboard they read Dynamo's `dynamo_component` and
`dynamo_endpoint` labels, since those metrics carry Dynamo's label names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

try:
    from grafana_foundation_sdk.builders import (
        common,
        gauge,
        prometheus,
        stat,
        timeseries,
    )
    from grafana_foundation_sdk.builders import dashboard as board
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as common_model
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models import prometheus as prometheus_model
except ModuleNotFoundError as error:
    raise SystemExit(f"{error}: install the `dashboards` extra (pip install -e '.[dashboards]')") from error

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioning/datasources/prometheus.yml
TAG = "llm-fleet"

# Label filters shared by the queries.
FLEET = 'namespace="$namespace", component=~"$component", endpoint=~"$endpoint"'
WORKER = FLEET + ', worker_id=~"$worker"'
COMPONENT = 'namespace="$namespace", dynamo_component=~"$component", dynamo_endpoint=~"$endpoint", worker_id=~"$worker"'
SELF = 'job="aggregator", namespace="$namespace"'
WORKER_LEGEND = "{{component}}/{{endpoint}} {{worker_id}} r{{dp_rank}}"
GROUP_LEGEND = "{{component}}/{{endpoint}}"


def variable(name: str, label: str, query: str, *, multi: bool = True) -> board.QueryVariable:
    # A plain-string query is what Grafana shows as the variable's definition and what its
    # Prometheus variable editor migrates on opening; the SDK has no `definition` field.
    built = (board.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
             .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)  # workers come and go
             .sort(model.VariableSort.ALPHABETICAL_ASC).multi(multi).include_all(multi)
             .hide(model.VariableHide.DONT_HIDE).regex("").options([]))
    if multi:
        built = built.all_value(".*").current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    return built


def fleet_variables(metric: str, worker_metric: str) -> list[board.QueryVariable]:
    return [
        variable("namespace", "Namespace", f"label_values({metric}, namespace)", multi=False),
        variable("component", "Component", f'label_values({metric}{{namespace="$namespace"}}, component)'),
        variable("endpoint", "Endpoint",
                 f'label_values({metric}{{namespace="$namespace", component=~"$component"}}, endpoint)'),
        variable("worker", "Worker", f"label_values({worker_metric}{{{FLEET}}}, worker_id)"),
    ]


def target(expr: str, legend: str = "") -> prometheus.Dataquery:
    return (prometheus.Dataquery().datasource(DATASOURCE).expr(expr).legend_format(legend or "__auto").range()
            .editor_mode(prometheus_model.QueryEditorMode.CODE))


Panel = stat.Panel | gauge.Panel | timeseries.Panel


class Panels:
    """The panels of one dashboard in reading order; the SDK places them on the 24-column grid."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []

    def timeseries(self, title: str, description: str, targets: Sequence[prometheus.Dataquery], unit: str = "short",
                   *, w: int = 12, h: int = 8, min_value: float | None = None,
                   max_value: float | None = None) -> None:
        panel = (timeseries.Panel().line_width(1).fill_opacity(10).show_points(common_model.VisibilityMode.NEVER)
                 .legend(common.VizLegendOptions().display_mode(common_model.LegendDisplayMode.LIST)
                         .placement(common_model.LegendPlacement.BOTTOM).show_legend(True))
                 .tooltip(common.VizTooltipOptions().mode(common_model.TooltipDisplayMode.MULTI)
                          .sort(common_model.SortOrder.DESCENDING)))
        self._add(panel, title, description, targets, unit, w, h, min_value, max_value)

    def single(self, kind: str, title: str, description: str, expr: str | Sequence[prometheus.Dataquery],
               unit: str = "short", *,
               thresholds: tuple[float, float] | None = None, max_value: float | None = None, w: int = 4,
               h: int = 5) -> None:
        steps = [model.Threshold(value=None, color="green")]
        if thresholds:
            steps += [model.Threshold(value=thresholds[0], color="orange"),
                      model.Threshold(value=thresholds[1], color="red")]
        reduce = common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)
        panel: stat.Panel | gauge.Panel
        if kind == "stat":
            panel = (stat.Panel().reduce_options(reduce).color_mode(common_model.BigValueColorMode.VALUE)
                     .graph_mode(common_model.BigValueGraphMode.AREA).text_mode(common_model.BigValueTextMode.AUTO)
                     .justify_mode(common_model.BigValueJustifyMode.AUTO))
        else:
            panel = gauge.Panel().reduce_options(reduce).show_threshold_labels(False).show_threshold_markers(True)
        panel.thresholds(board.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
        self._add(panel, title, description, [target(expr)] if isinstance(expr, str) else expr, unit, w, h, 0,
                  max_value)

    def _add(self, panel: Panel, title: str, description: str, targets: Sequence[prometheus.Dataquery], unit: str,
             w: int, h: int, min_value: float | None, max_value: float | None) -> None:
        panel.id(len(self.panels) + 1).title(title).description(description).datasource(DATASOURCE)
        panel.span(w).height(h).unit(unit).overrides([])
        if min_value is not None:
            panel.min(min_value)
        if max_value is not None:
            panel.max(max_value)
        for index, query in enumerate(targets):
            panel.with_target(query.ref_id(chr(ord("A") + index)))
        self.panels.append(panel)


def dashboard(uid: str, title: str, description: str, variables: Sequence[board.QueryVariable],
              panels: Panels) -> board.Dashboard:
    built = (board.Dashboard(title).uid(uid).description(description).tags([TAG]).timezone("browser").editable()
             .tooltip(model.DashboardCursorSync.CROSSHAIR).version(1).refresh("5s").time("now-15m", "now")
             .annotations([])  # Grafana adds its built-in annotation query on load
             .link(board.DashboardLink("LLM fleet dashboards").type(model.DashboardLinkType.DASHBOARDS).tags([TAG])
                   .as_dropdown(True).include_vars(True).keep_time(True)))
    for item in variables:
        built.with_variable(item)
    for panel in panels.panels:
        built.with_panel(panel)  # placed left to right, a new row when 24 columns are full
    return built


HIT_RATE_SOURCES = ("Dynamo 0.x: overlapping blocks / ISL blocks of the router's decisions (kv-hit-rate events). "
                    "Dynamo 1.x, which has no such events: prompt tokens read from the prefix cache / all prompt "
                    "tokens of the engines' forward passes.")
PREFILL_CACHED, PREFILL_COMPUTED = "llm_prefill_tokens_from_cache_total", "llm_prefill_tokens_computed_total"


def legacy_hit_rate(labels: str, *, by: str | None = "") -> str:
    """100 * overlap / ISL blocks over the rate interval: of the fleet (`by` its labels, "" for all) or, with
    `by=None`, per worker (its own counters)."""
    if by is None:
        return (f"100 * rate(llm_kv_hit_rate_overlap_blocks_total{{{labels}}}[$__rate_interval]) "
                f"/ rate(llm_kv_hit_rate_isl_blocks_total{{{labels}}}[$__rate_interval])")
    group = f" by ({by})" if by else ""
    return (f"100 * sum{group} (rate(llm_fleet_kv_hit_rate_overlap_blocks_total{{{labels}}}[$__rate_interval])) "
            f"/ sum{group} (rate(llm_fleet_kv_hit_rate_isl_blocks_total{{{labels}}}[$__rate_interval]))")


def legacy_hit_rate_total() -> str:
    return (f"100 * sum(llm_fleet_kv_hit_rate_overlap_blocks_total{{{FLEET}}}) "
            f"/ sum(llm_fleet_kv_hit_rate_isl_blocks_total{{{FLEET}}})")


def engine_hit_rate(labels: str, *, by: str | None = "", total: bool = False) -> str:
    """100 * prompt tokens from the cache / all prompt tokens of 1.x forward passes: over the rate interval, or
    with `total` since the workers started; summed `by` (None: per worker)."""
    def term(name: str) -> str:
        series = f"{name}{{{labels}}}" if total else f"rate({name}{{{labels}}}[$__rate_interval])"
        if by is None:
            return series
        return f"sum{f' by ({by})' if by else ''} ({series})"
    return f"100 * {term(PREFILL_CACHED)} / ({term(PREFILL_CACHED)} + {term(PREFILL_COMPUTED)})"


def llm_fleet() -> board.Dashboard:
    p = Panels()
    p.single("stat", "Live workers", "Workers heard from within the aggregator's --stale-after.",
             f"sum(llm_workers{{{FLEET}}})")
    p.single("stat", "Workers expired (time range)",
             "Workers dropped after falling silent, in the selected time range. Non-zero: workers crash, "
             "hang or lose NATS.", f"sum(increase(llm_workers_expired_total{{{FLEET}}}[$__range]))",
             thresholds=(1, 5))
    p.single("gauge", "KV cache utilisation", "Active KV blocks as a share of all KV blocks of the selected workers.",
             f"100 * sum(llm_kv_blocks_active{{{WORKER}}}) / sum(llm_kv_blocks_total{{{WORKER}}})", "percent",
             thresholds=(70, 90), max_value=100)
    p.single("gauge", "Request slot utilisation", "Active request slots as a share of all slots.",
             f"100 * sum(llm_requests_active_slots{{{WORKER}}}) / sum(llm_requests_total_slots{{{WORKER}}})",
             "percent", thresholds=(70, 90), max_value=100)
    p.single("gauge", "KV hit rate (cumulative)", HIT_RATE_SOURCES + " Cumulative: since the aggregator started "
             "(0.x) or since each live 1.x worker started.", [
                 target(legacy_hit_rate_total(), "0.x routing"),
                 target(engine_hit_rate(WORKER, total=True), "1.x engines")], "percent", max_value=100)
    p.single("stat", "KV hit rate (recent)", "The same ratios over the last rate interval only.", [
        target(legacy_hit_rate(FLEET), "0.x routing"), target(engine_hit_rate(WORKER), "1.x engines")], "percent")
    p.timeseries("KV cache utilisation by worker", "Active / total KV blocks per worker (data-parallel rank).", [
        target(f"100 * llm_kv_blocks_active{{{WORKER}}} / llm_kv_blocks_total{{{WORKER}}}", WORKER_LEGEND),
    ], "percent", min_value=0, max_value=100)
    p.timeseries("Request slot utilisation by worker", "Active / total request slots per worker.", [
        target(f"100 * llm_requests_active_slots{{{WORKER}}} / llm_requests_total_slots{{{WORKER}}}",
               WORKER_LEGEND),
    ], "percent", min_value=0, max_value=100)
    p.timeseries("Load average and standard deviation",
                 "Mean and population standard deviation of active KV blocks across live workers. A std "
                 "close to the mean means the router spreads load unevenly.", [
                     target(f"llm_load_avg{{{FLEET}}}", "average " + GROUP_LEGEND),
                     target(f"llm_load_std{{{FLEET}}}", "std " + GROUP_LEGEND),
                 ], min_value=0)
    p.timeseries("Live workers and expiries", "Live workers per component endpoint; bars of expiries.", [
        target(f"sum by (component, endpoint) (llm_workers{{{FLEET}}})", "live " + GROUP_LEGEND),
        target(f"sum by (component, endpoint) (increase(llm_workers_expired_total{{{FLEET}}}[$__rate_interval]))",
               "expired " + GROUP_LEGEND),
    ], min_value=0)
    p.timeseries("KV hit rate by worker", HIT_RATE_SOURCES + " Cumulative per worker (since it appeared) and over "
                 "the rate interval.", [
                     target(f"llm_kv_hit_rate_percent{{{WORKER}}}", "cumulative " + WORKER_LEGEND),
                     target(legacy_hit_rate(WORKER, by=None), "recent " + WORKER_LEGEND),
                     target(engine_hit_rate(WORKER, by=None, total=True), "cumulative 1.x " + WORKER_LEGEND),
                     target(engine_hit_rate(WORKER, by=None), "recent 1.x " + WORKER_LEGEND),
                 ], "percent", min_value=0, max_value=100)
    p.timeseries("Fleet KV hit rate", HIT_RATE_SOURCES + " Per component endpoint: cumulative (0.x: since the "
                 "aggregator started, expired workers included; 1.x: of the live workers) and over the rate "
                 "interval.", [
                     target(f"llm_fleet_kv_hit_rate_percent{{{FLEET}}}", "cumulative " + GROUP_LEGEND),
                     target(legacy_hit_rate(FLEET, by="component, endpoint"), "recent " + GROUP_LEGEND),
                     target(engine_hit_rate(WORKER, by="component, endpoint", total=True),
                            "cumulative 1.x " + GROUP_LEGEND),
                     target(engine_hit_rate(WORKER, by="component, endpoint"), "recent 1.x " + GROUP_LEGEND),
                 ], "percent", min_value=0, max_value=100)
    p.timeseries("Waiting requests", "Requests queued for a slot, as each worker reports it; the fleet total.", [
        target(f"llm_requests_waiting{{{WORKER}}}", WORKER_LEGEND),
        target(f"sum(llm_requests_waiting{{{WORKER}}})", "total"),
    ], min_value=0)
    p.timeseries("Available KV blocks and request slots", "Free capacity per component endpoint.", [
        target(f"sum by (component, endpoint) (llm_kv_blocks_total{{{WORKER}}} - llm_kv_blocks_active{{{WORKER}}})",
               "KV blocks " + GROUP_LEGEND),
        target(f"sum by (component, endpoint) (llm_requests_total_slots{{{WORKER}}} "
               f"- llm_requests_active_slots{{{WORKER}}})", "slots " + GROUP_LEGEND),
    ], min_value=0)
    p.timeseries("Seconds since each worker's last message",
                 "Climbs towards --stale-after for a worker that stalls, then the worker expires.", [
                     target(f"time() - llm_worker_last_seen_timestamp_seconds{{{WORKER}}}", WORKER_LEGEND),
                 ], "s", w=24, min_value=0)
    return dashboard("llm-fleet", "LLM fleet", "KV cache, request slots, load balance and KV hit rate of every "
                     "worker, from the aggregator.", fleet_variables("llm_workers", "llm_worker_last_seen_timestamp_seconds"),
                     p)


# Series only Dynamo 1.x workers have: this dashboard's variables list 1.x workers alone.
V1_SERIES = '__name__=~"llm_kv_active_decode_blocks|llm_kv_cached_blocks_reliable|llm_prefill_tokens_computed_total"'


def dynamo_v1() -> board.Dashboard:
    variables = [
        variable("namespace", "Namespace", "label_values(llm_workers, namespace)", multi=False),
        variable("component", "Component", f'label_values({{{V1_SERIES}, namespace="$namespace"}}, component)'),
        variable("endpoint", "Endpoint", f'label_values({{{V1_SERIES}, namespace="$namespace", '
                 f'component=~"$component"}}, endpoint)'),
        variable("worker", "Worker", f"label_values({{{V1_SERIES}, {FLEET}}}, worker_id)"),
    ]
    computed, cached = PREFILL_COMPUTED, PREFILL_CACHED

    p = Panels()
    p.single("stat", "Engine prefix-cache hit rate",
             "Prompt tokens read from the KV cache / all prompt tokens of the forward passes, over the rate interval "
             "(earlier chunks of a chunked prefill count as read).", engine_hit_rate(WORKER), "percent", max_value=100, w=5)
    p.single("stat", "Forward pass p99", "Wall time of the engines' iterations (idle heartbeats left out).",
             "histogram_quantile(0.99, sum by (le) (rate(llm_forward_pass_duration_seconds_bucket"
             f"{{{WORKER}}}[$__rate_interval])))", "s", w=5)
    p.single("stat", "Cached KV blocks", "Blocks the selected workers hold, every storage tier, from their "
             "kv-events.", f"sum(llm_kv_cached_blocks{{{WORKER}}})", w=5)
    p.single("stat", "Inexact block counts", "Worker ranks whose cached-block count may be wrong (events missed "
             "since they started, or a memory limit hit) until their next `cleared`.",
             f"sum(1 - llm_kv_cached_blocks_reliable{{{WORKER}}})", thresholds=(1, 5), w=4)
    p.single("stat", "Events lost (time range)", "Event-plane messages never received: gaps in their publishers' "
             "sequence numbers (NATS dropped them).",
             f"sum(increase(llm_aggregator_event_plane_lost_events_total{{{FLEET}}}[$__range]))", thresholds=(1, 100),
             w=5)
    p.timeseries("Engine prefix-cache hit rate by worker", "From the engines' own forward passes: the real prefix "
                 "reuse, where the router's dynamo_component_router_kv_hit_rate is its prediction.", [
                     target(engine_hit_rate(WORKER, by="component, endpoint, worker_id, dp_rank"), WORKER_LEGEND)],
                 "percent", min_value=0, max_value=100)
    p.timeseries("Prefill tokens", "Prompt tokens per second, computed and read from the KV cache.", [
        target(f"sum by (component, endpoint) (rate({computed}{{{WORKER}}}[$__rate_interval]))",
               "computed " + GROUP_LEGEND),
        target(f"sum by (component, endpoint) (rate({cached}{{{WORKER}}}[$__rate_interval]))",
               "from cache " + GROUP_LEGEND),
    ], min_value=0)
    p.timeseries("Forward pass duration", "Percentiles of the engines' iteration wall time.", [
        target(f"histogram_quantile({q}, sum by (le, component, endpoint) (rate("
               f"llm_forward_pass_duration_seconds_bucket{{{WORKER}}}[$__rate_interval])))",
               f"p{round(q * 100)} " + GROUP_LEGEND) for q in (0.5, 0.99)
    ], "s", min_value=0)
    p.timeseries("Running and waiting requests", "Of each worker's last forward pass: scheduled prefill + decode, "
                 "and queued + preempted (0 once it idles).", [
                     target(f"llm_requests_active_slots{{{WORKER}}}", "running " + WORKER_LEGEND),
                     target(f"llm_requests_waiting{{{WORKER}}}", "waiting " + WORKER_LEGEND),
                 ], min_value=0)
    p.timeseries("KV blocks in use and in decode", "kv_metrics: blocks in use (kv_used_blocks) and those of "
                 "requests in decode.", [
                     target(f"llm_kv_blocks_active{{{WORKER}}} and on (component, endpoint, worker_id, dp_rank) "
                            f"llm_kv_active_decode_blocks{{{WORKER}}}", "used " + WORKER_LEGEND),
                     target(f"llm_kv_active_decode_blocks{{{WORKER}}}", "decode " + WORKER_LEGEND),
                 ], min_value=0)
    p.timeseries("Cached KV blocks by tier", "Blocks each worker rank holds per storage tier, from its kv-events "
                 "(exact while llm_kv_cached_blocks_reliable is 1).", [
                     target(f"llm_kv_cached_blocks{{{WORKER}}}", WORKER_LEGEND + " {{storage_tier}}"),
                 ], min_value=0)
    p.timeseries("Event plane", "Lost events and publisher (re)starts per topic, over the rate interval.", [
        target(f"sum by (topic) (increase(llm_aggregator_event_plane_lost_events_total{{{FLEET}}}"
               "[$__rate_interval]))", "lost {{topic}}"),
        target(f"sum by (topic) (increase(llm_aggregator_event_plane_publisher_starts_total{{{FLEET}}}"
               "[$__rate_interval]))", "starts {{topic}}"),
    ], w=24, min_value=0)
    return dashboard("llm-fleet-dynamo1", "LLM fleet: Dynamo 1.x", "What only Dynamo 1.x workers publish: the engines' "
                     "forward passes (prefix-cache hit rate, iteration time), KV blocks in decode, cached blocks from "
                     "kv-events, and the event plane's health. Capacity and the shared KV/request series are on the "
                     "LLM fleet dashboard.", variables, p)


def gpus() -> board.Dashboard:
    gpu = WORKER
    legend = "{{worker_id}} GPU {{gpu}} ({{modelName}})"
    p = Panels()
    p.single("stat", "GPUs", "GPUs reported by the selected workers.", f"count(DCGM_FI_DEV_GPU_UTIL{{{gpu}}})")
    p.single("gauge", "Mean GPU utilisation", "", f"avg(DCGM_FI_DEV_GPU_UTIL{{{gpu}}})", "percent",
             max_value=100, thresholds=(80, 95))
    p.single("gauge", "Framebuffer used", "Used / (used + free) framebuffer over the selected GPUs.",
             f"100 * sum(DCGM_FI_DEV_FB_USED{{{gpu}}}) / (sum(DCGM_FI_DEV_FB_USED{{{gpu}}}) "
             f"+ sum(DCGM_FI_DEV_FB_FREE{{{gpu}}}))", "percent", max_value=100, thresholds=(85, 95))
    p.single("gauge", "Hottest GPU", "", f"max(DCGM_FI_DEV_GPU_TEMP{{{gpu}}})", "celsius", max_value=100,
             thresholds=(75, 85))
    p.single("stat", "Power draw", "Sum over the selected GPUs.", f"sum(DCGM_FI_DEV_POWER_USAGE{{{gpu}}})", "watt")
    p.single("stat", "KV blocks per GiB of framebuffer",
             "KV cache capacity the workers report per GiB of their GPUs' framebuffer.",
             f"sum(llm_kv_blocks_total{{{WORKER}}}) / (sum(DCGM_FI_DEV_FB_USED{{{gpu}}} "
             f"+ DCGM_FI_DEV_FB_FREE{{{gpu}}}) / 1024)")
    p.timeseries("GPU utilisation", "Share of time a kernel ran (DCGM_FI_DEV_GPU_UTIL).", [
        target(f"DCGM_FI_DEV_GPU_UTIL{{{gpu}}}", legend)], "percent", min_value=0, max_value=100)
    p.timeseries("Memory copy utilisation", "Share of time the memory interface was busy.", [
        target(f"DCGM_FI_DEV_MEM_COPY_UTIL{{{gpu}}}", legend)], "percent", min_value=0, max_value=100)
    p.timeseries("Framebuffer", "Used and free framebuffer (DCGM reports MiB).", [
        target(f"DCGM_FI_DEV_FB_USED{{{gpu}}} * 1024 * 1024", "used " + legend),
        target(f"DCGM_FI_DEV_FB_FREE{{{gpu}}} * 1024 * 1024", "free " + legend),
    ], "bytes", min_value=0)
    p.timeseries("Temperatures", "", [
        target(f"DCGM_FI_DEV_GPU_TEMP{{{gpu}}}", "GPU " + legend),
        target(f"DCGM_FI_DEV_MEMORY_TEMP{{{gpu}}}", "memory " + legend),
    ], "celsius")
    p.timeseries("Power", "Instantaneous draw, and the average over the rate interval from the energy counter "
                 "(mJ → W).", [
                     target(f"DCGM_FI_DEV_POWER_USAGE{{{gpu}}}", "draw " + legend),
                     target(f"rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{gpu}}}[$__rate_interval]) / 1000",
                            "from energy " + legend),
                 ], "watt", min_value=0)
    p.timeseries("Clocks", "SM and memory clocks (DCGM reports MHz).", [
        target(f"DCGM_FI_DEV_SM_CLOCK{{{gpu}}} * 1000000", "SM " + legend),
        target(f"DCGM_FI_DEV_MEM_CLOCK{{{gpu}}} * 1000000", "memory " + legend),
    ], "hertz", min_value=0)
    return dashboard("llm-fleet-gpus", "LLM fleet: GPUs", "DCGM-named GPU readings each worker publishes, "
                     "re-exported by the aggregator per worker.",
                     fleet_variables("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_UTIL"), p)


def components() -> board.Dashboard:
    c = COMPONENT
    by = "dynamo_component, dynamo_endpoint"
    legend = "{{dynamo_component}}/{{dynamo_endpoint}}"
    metric = "dynamo_component_requests_total"
    variables = [
        variable("namespace", "Namespace", f"label_values({metric}, namespace)", multi=False),
        variable("component", "Component", f'label_values({metric}{{namespace="$namespace"}}, dynamo_component)'),
        variable("endpoint", "Endpoint", f'label_values({metric}{{namespace="$namespace", '
                 f'dynamo_component=~"$component"}}, dynamo_endpoint)'),
        variable("worker", "Worker", f'label_values({metric}{{namespace="$namespace", dynamo_component=~"$component", '
                 f'dynamo_endpoint=~"$endpoint"}}, worker_id)'),
    ]
    p = Panels()
    p.single("stat", "Requests / s", "", f"sum(rate(dynamo_component_requests_total{{{c}}}[$__rate_interval]))",
             "reqps", w=6)
    p.single("stat", "Errors / request", "Errors of every type per request, over the rate interval.",
             f"sum(rate(dynamo_component_errors_total{{{c}}}[$__rate_interval])) "
             f"/ sum(rate(dynamo_component_requests_total{{{c}}}[$__rate_interval]))", "percentunit",
             thresholds=(0.01, 0.05), w=6)
    p.single("stat", "In flight", "", f"sum(dynamo_component_inflight_requests{{{c}}})", w=6)
    p.single("stat", "p99 duration", "",
             f"histogram_quantile(0.99, sum by (le) (rate(dynamo_component_request_duration_seconds_bucket{{{c}}}"
             "[$__rate_interval])))", "s", w=6)
    p.timeseries("Request rate", "Per component endpoint.", [
        target(f"sum by ({by}) (rate(dynamo_component_requests_total{{{c}}}[$__rate_interval]))", legend)],
        "reqps", min_value=0)
    quantiles = [
        target(f"histogram_quantile({q}, sum by (le, {by}) (rate(dynamo_component_request_duration_seconds_bucket"
               f"{{{c}}}[$__rate_interval])))", f"p{round(q * 100)} {legend}")
        for q in (0.5, 0.9, 0.99)
    ]
    quantiles.append(target(
        f"sum by ({by}) (rate(dynamo_component_request_duration_seconds_sum{{{c}}}[$__rate_interval])) "
        f"/ sum by ({by}) (rate(dynamo_component_request_duration_seconds_count{{{c}}}[$__rate_interval]))",
        "mean " + legend))
    p.timeseries("Request duration", "Percentiles from the histogram, and the mean.", quantiles, "s", min_value=0)
    p.timeseries("Errors by type", "", [
        target(f"sum by ({by}, error_type) (rate(dynamo_component_errors_total{{{c}}}[$__rate_interval]))",
               legend + " {{error_type}}")], "reqps", min_value=0)
    p.timeseries("In-flight requests by worker", "", [
        target(f"dynamo_component_inflight_requests{{{c}}}", legend + " {{worker_id}}")], min_value=0)
    p.timeseries("Request rate by worker", "A worker far below its peers is starved by the router or slow.", [
        target(f"sum by ({by}, worker_id) (rate(dynamo_component_requests_total{{{c}}}[$__rate_interval]))",
               legend + " {{worker_id}}")], "reqps", min_value=0)
    p.timeseries("Request and response bytes", "", [
        target(f"sum by ({by}) (rate(dynamo_component_request_bytes_total{{{c}}}[$__rate_interval]))",
               "request " + legend),
        target(f"sum by ({by}) (rate(dynamo_component_response_bytes_total{{{c}}}[$__rate_interval]))",
               "response " + legend),
    ], "Bps", min_value=0)
    p.timeseries("Worker uptime", "Drops to zero when a worker process restarts.", [
        target('dynamo_component_uptime_seconds{namespace="$namespace", worker_id=~"$worker"}', "{{worker_id}}")],
        "s", w=24, min_value=0)
    return dashboard("llm-fleet-components", "LLM fleet: components", "Dynamo component endpoint metrics "
                     "(dynamo_component_*) of every worker, re-exported by the aggregator.", variables, p)


def aggregator() -> board.Dashboard:
    variables = [variable("namespace", "Namespace", "label_values(llm_aggregator_nats_connected, namespace)",
                          multi=False)]
    p = Panels()
    p.single("stat", "Aggregator up", "Prometheus's scrape of the aggregator (1 = up).",
             f"min(up{{{SELF}}})", thresholds=None, w=4)
    p.single("stat", "NATS connected", "1 while connected to NATS and subscribed.",
             f"min(llm_aggregator_nats_connected{{{SELF}}})", w=4)
    p.single("stat", "Messages / s", "Received from NATS, every kind.",
             f"sum(rate(llm_aggregator_messages_received_total{{{SELF}}}[$__rate_interval]))", "short", w=4)
    p.single("stat", "Rejected (time range)", "Messages dropped as invalid or over a limit.",
             f"sum(increase(llm_aggregator_messages_rejected_total{{{SELF}}}[$__range]))", thresholds=(1, 100), w=4)
    p.single("stat", "Workers expired (time range)", "",
             f"sum(increase(llm_workers_expired_total{{{SELF}}}[$__range]))", thresholds=(1, 5), w=4)
    p.single("stat", "Resident memory", "", f"max(process_resident_memory_bytes{{{SELF}}})", "bytes", w=4)
    p.timeseries("Ingest rate by kind", "Received and accepted messages per second.", [
        target(f"sum by (kind) (rate(llm_aggregator_messages_received_total{{{SELF}}}[$__rate_interval]))",
               "received {{kind}}"),
        target(f"sum by (kind) (rate(llm_aggregator_messages_accepted_total{{{SELF}}}[$__rate_interval]))",
               "accepted {{kind}}"),
    ], min_value=0)
    p.timeseries("Rejects by reason", "not_json, missing_field, wrong_type, out_of_range, inconsistent, oversized, "
                 "worker_limit, …: the aggregator's log names the subject.", [
                     target(f"sum by (kind, reason) (rate(llm_aggregator_messages_rejected_total{{{SELF}}}"
                            "[$__rate_interval]))", "{{kind}} {{reason}}"),
                 ], min_value=0)
    p.timeseries("Worker expiries", "Workers dropped for silence, per component endpoint.", [
        target(f"sum by (component, endpoint) (increase(llm_workers_expired_total{{{SELF}}}[$__rate_interval]))",
               GROUP_LEGEND)], min_value=0)
    p.timeseries("Scrape duration", "The aggregator's own collect+encode time (histogram) and Prometheus's view "
                 "of the whole scrape.", [
                     target(f"histogram_quantile(0.5, sum by (le) (rate(llm_aggregator_scrape_duration_seconds_bucket"
                            f"{{{SELF}}}[$__rate_interval])))", "p50 collect+encode"),
                     target(f"histogram_quantile(0.99, sum by (le) (rate(llm_aggregator_scrape_duration_seconds_bucket"
                            f"{{{SELF}}}[$__rate_interval])))", "p99 collect+encode"),
                     target(f"max(scrape_duration_seconds{{{SELF}}})", "Prometheus scrape"),
                 ], "s", min_value=0)
    p.timeseries("Series per scrape", "Samples in each scrape; grows with workers × series per worker.", [
        target(f"max(scrape_samples_scraped{{{SELF}}})", "samples")], min_value=0)
    p.timeseries("NATS connection events", "", [
        target(f"sum(increase(llm_aggregator_nats_disconnects_total{{{SELF}}}[$__rate_interval]))", "disconnects"),
        target(f"sum(increase(llm_aggregator_nats_reconnects_total{{{SELF}}}[$__rate_interval]))", "reconnects"),
        target(f"sum(increase(llm_aggregator_nats_errors_total{{{SELF}}}[$__rate_interval]))", "errors"),
    ], min_value=0)
    p.timeseries("Dynamo 1.x: tracked KV blocks", "Block hashes held to count workers' cached blocks (~80-90 bytes "
                 "each) and blocks left untracked under --max-cached-blocks(-per-worker).", [
                     target(f"max(llm_aggregator_kv_blocks_tracked{{{SELF}}})", "tracked"),
                     target(f"sum by (limit) (increase(llm_aggregator_kv_blocks_untracked_total{{{SELF}}}"
                            "[$__rate_interval]))", "untracked, {{limit}} limit"),
                 ], min_value=0)
    p.timeseries("CPU", "CPU cores the aggregator process uses.", [
        target(f"rate(process_cpu_seconds_total{{{SELF}}}[$__rate_interval])", "CPU cores {{instance}}"),
    ], min_value=0)
    p.timeseries("Scrape targets", "Every Prometheus target of the stack (1 = up).", [
        target("up", "{{job}} {{instance}}")], min_value=0, max_value=1)
    return dashboard("llm-fleet-aggregator", "LLM fleet: aggregator", "The aggregator's own health: ingest, "
                     "rejects, expiries, scrape cost, NATS connection.", variables, p)


DASHBOARDS = {"llm-fleet.json": llm_fleet, "gpus.json": gpus, "components.json": components,
              "aggregator.json": aggregator, "dynamo-v1.json": dynamo_v1}


def render() -> dict[str, str]:
    return {name: json.dumps(build().build(), cls=JSONEncoder, indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)


if __name__ == "__main__":
    main()
