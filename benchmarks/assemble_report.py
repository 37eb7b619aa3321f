"""Write a ``steerplug report`` folder from per-configuration cache files.

For sweeps split across processes (``steerplug report --methods ...`` in parallel, one cache
folder): each process writes its rows' cache files; this puts the chosen ones into one table,
JSON, samples file and Pareto plot, with the calibration ("prepared") of one of the runs. Every
answer is judged again with the current judge (``STEERPLUG_JUDGE``, default the phrase judge).

    python benchmarks/assemble_report.py --cache reports/cache --out reports/NAME \\
        --prepared-from reports/tmp-c/results.json --command "..." KEY1 KEY2 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerplug.judge import get_judge
from steerplug.report import (HARMFUL_SETS, HARMLESS_SETS, HELLASWAG_TASK, frontier_summary, markdown, pareto_plot,
                              rejudge, summarise)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("keys", nargs="+", help="cache file names (without .json), in table order; the first is the baseline")
    p.add_argument("--cache", default="reports/cache")
    p.add_argument("--out", required=True)
    p.add_argument("--prepared-from", required=True, help="a results.json whose meta has the calibration")
    p.add_argument("--command", required=True, help="the report commands that produced the cache files")
    args = p.parse_args()
    results = [json.loads((Path(args.cache) / f"{k}.json").read_text()) for k in args.keys]
    rejudge(results, get_judge())  # as run_report does: cached answers, today's judge
    harm_tasks = [t for t in [*HARMFUL_SETS.values(), *HARMLESS_SETS.values()] if t in results[0]["tasks"]]
    rows = summarise(results, harm_tasks)
    base_meta = json.loads(Path(args.prepared_from).read_text())["meta"]
    n = {t: results[0]["tasks"][t]["n"] for t in harm_tasks + [HELLASWAG_TASK] if t in results[0]["tasks"]}
    meta = {**base_meta, "command": args.command, "n": n, "assembled_from": args.keys,
            "seconds": sum(r["seconds"] for r in results), "frontier": frontier_summary(rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out / "samples.json").write_text(json.dumps(
        {r["method"]["name"]: {t: v["samples"] for t, v in r["tasks"].items() if t != HELLASWAG_TASK}
         for r in results}, indent=1, default=str))
    (out / "results.md").write_text(markdown(rows, meta, harm_tasks))
    pareto_plot(rows, out / "pareto.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
