"""`normopt passes`."""

from __future__ import annotations

from rich.table import Table

from normopt import api
from normopt.cli.application import command, out, print_json
from normopt.cli.options import (
    JsonOpt,
    ReportOpt,
)


@command
def passes(json_out: JsonOpt = False, report: ReportOpt = None) -> None:
    """List the passes, one line each."""
    doc = api.list_passes(report=report)
    if json_out:
        print_json(doc)
        return
    table = Table(title="normopt passes")
    table.add_column("pass")
    table.add_column("in default pipeline")
    table.add_column("what it does")
    default, last = doc["default_pipeline"], doc["always_after"]
    for name, summary in doc["passes"].items():
        where = "yes" if name in default else "always last" if name in last else "no"
        table.add_row(name, where, summary)
    out.print(table)
