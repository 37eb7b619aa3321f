"""``steerplug report``: a safety / capability sweep through lm-eval, as a table and a Pareto plot.

One command evaluates, on the same model and the same prompts, every steering family over the
shipped bundle (:mod:`steerplug.report.methods`): unsteered, a safety system prompt, the shipped
default configuration exactly as ``SteeredModel.from_pretrained()`` loads it, activation addition
(CAA) with the bundle's directions, gradient steering (the seed's ``encode(h) . w`` descent) and
the ``target`` decoder step, each gated by the bundle's gate and ungated; on refusal of harmful
prompts (JailbreakBench, HarmBench test, refusal-direction ``harmful_test``, a prompt held by
several sets counted once), over-refusal of harmless ones (JailbreakBench benign, ``harmless_test``,
XSTest safe) through the chat template, coherence, answer perplexity under the unsteered model and
HellaSwag ``acc_norm`` (no chat template). It writes ``results.json``, ``results.md``,
``samples.json`` and ``pareto.png`` into ``--out``, and checks the rows against targets passed in
(default :data:`~steerplug.report.summary.ISSUE_TARGETS`).

Rooms: ``methods`` (the rows), ``run`` (lm-eval runs and the cache), ``summary`` (judging, rows,
targets, Pareto front), ``render`` (Markdown, plot), ``cli``.

Each row's results are cached under ``--cache-dir`` by a hash of the model, the steerplug version,
the ``evals/`` task files, the data files, the settings and, for a steering row, its resolved
configuration and the content of every artifact it reads: a changed input never reuses a result.
Greedy decoding, fixed seeds; ``--limit N`` takes N prompts of each set after a seeded shuffle
(seed 1234), and the first ``--hellaswag-limit`` HellaSwag items in file order.
"""

from steerplug.report.cli import add_arguments, run
from steerplug.report.methods import (BASELINE_FAMILIES, FAMILIES, GRADIENT_FAMILIES, HARMFUL_SETS, HARMLESS_SETS,
                                      HELLASWAG_TASK, SAFETY_SYSTEM_PROMPT, Method, default_methods)
from steerplug.report.render import frontier_markdown, markdown, pareto_plot
from steerplug.report.run import (EVALS_DIR, SEED, answer_perplexity, artifacts_digest, code_and_data_digest,
                                  method_key, run_method, run_report)
from steerplug.report.summary import (ISSUE_TARGETS, frontier_summary, misses, pareto_front, rejudge, summarise,
                                      unique_samples)

__all__ = ["BASELINE_FAMILIES", "EVALS_DIR", "FAMILIES", "GRADIENT_FAMILIES", "HARMFUL_SETS", "HARMLESS_SETS",
           "HELLASWAG_TASK", "ISSUE_TARGETS", "SAFETY_SYSTEM_PROMPT", "SEED", "Method", "add_arguments",
           "answer_perplexity", "artifacts_digest", "code_and_data_digest", "default_methods",
           "frontier_markdown", "frontier_summary", "markdown", "method_key", "misses", "pareto_front",
           "pareto_plot", "rejudge", "run", "run_method", "run_report", "summarise", "unique_samples"]
