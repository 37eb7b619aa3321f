"""Cost of the answer_tokens cut in the hooks' position selection, per hook call (decode step, batch 8).

    .venv/bin/python benchmarks/bench_select_positions.py

Alternates the span selection alone (_select_span, what _select_positions was before) with
_select_positions, 7 rounds of 20,000 calls, medians."""
import statistics, time, torch
from steerplug import CallState
from steerplug.steering import SteeringConfig
from steerplug.hooks import _select_positions, _select_span
st = CallState(gen_start=20, prompt_end=21); st.past_len = 25
cfgs = {"answer_tokens=None": SteeringConfig(positions="generated"), "answer_tokens=8": SteeringConfig(positions="generated", answer_tokens=8)}
dev = torch.device("cpu")
for name, cfg in cfgs.items():
    old, new = [], []
    for _ in range(7):
        for fn, acc in ((_select_span, old), (_select_positions, new)):
            t = time.perf_counter()
            for _ in range(20000): fn(st, cfg, 8, 1, dev)
            acc.append((time.perf_counter() - t) / 20000 * 1e6)
    print(f"{name}: old span {statistics.median(old):.2f} us, new {statistics.median(new):.2f} us per hook call")
