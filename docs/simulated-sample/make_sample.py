"""Makes this folder: simulated fp8, int4-awq and int8-sq builds of the mid model against fp32.

    python docs/simulated-sample/make_sample.py CHECKPOINT docs/simulated-sample

(the library entry point behind `convllava-export validate --simulate FORMAT`)
"""

import sys
import time

import torch

from convllava_export.validation.data import load_items
from convllava_export.validation.report import write_reports
from convllava_export.validation.run import Gates, validate

torch.set_num_threads(1)  # a shared 2-core machine: one thread avoids OpenMP oversubscription
checkpoint, out = sys.argv[1], sys.argv[2]
t0 = time.time()
report, images = validate(
    [],  # no real builds: only simulated ones
    checkpoint,
    load_items("builtin:48"),
    Gates(min_cosine=0.99, min_agreement=0.95),
    max_new_tokens=32,
    simulate=["fp8", "int4-awq", "int8-sq"],
    calib="builtin",
    calib_limit=32,
    progress=lambda m: print(f"[{time.time() - t0:7.1f}s] {m}", flush=True),
)
write_reports(report, images, out)
print("| build | vision cosine mean / min | KL | top-1 agreement | greedy exact | token agreement | task accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for b in report["builds"]:
    m = b["metrics"]
    print(f"| {b['name']} | {m['vision_cosine']['mean']:.5f} / {m['vision_cosine']['min']:.5f} | {m['kl_mean']:.5f} | {m['top1_agreement']:.4f} | "
          f"{m['greedy_exact_match']:.3f} | {m['token_agreement']:.3f} | {m['task_accuracy']:.3f} |")
print(f"| reference (torch fp32) | 1 | 0 | 1 | 1 | 1 | {report['reference']['task_accuracy']:.3f} |")
print(f"passed: {report['passed']}; failures: {[(f['build'], f['metric']) for f in report['failures']]}; {time.time() - t0:.0f} s")
