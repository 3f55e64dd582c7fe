"""What Prometheus accepts as a metric or label name: checked by the worker library before
it publishes and by the aggregator before it re-exports."""

from __future__ import annotations

import re

# fullmatch only: `$` would also match before a final newline.
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
