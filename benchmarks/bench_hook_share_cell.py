"""One cell of bench_steering.py's in-place hook share (sparse 64-feature vector, batch 8, steps 5), for
comparing two commits on the same day: run it from each commit's tree, alternately.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_hook_share_cell.py
"""
import sys, time, statistics, os
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch; torch.set_num_threads(1)
import bench_steering as B
import steerplug.steered_model as sm
assert sm.__file__.startswith(os.getcwd()), sm.__file__
spent = [0.0]; orig = sm.make_steer_fn
def mk(*a, **k):
    f = orig(*a, **k)
    def t(h):
        s = time.perf_counter(); o = f(h); spent[0] += time.perf_counter() - s; return o
    return t
sm.make_steer_fn = mk
steered, _ = B.build("sparse64")
enc = B.batch_inputs(steered.tokenizer, 8)
B.timed_generate(steered, enc, 4, 3, True)
sh = []
for _ in range(3):
    spent[0] = 0.0
    tot = B.timed_generate(steered, enc, 32, 5, True)
    sh.append(spent[0] / tot)
print(os.getcwd(), "sparse64 batch 8 steps 5 share %.2f%%" % (100 * statistics.median(sh)), [round(100*x, 2) for x in sh])
