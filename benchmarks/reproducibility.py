"""Do this machine's CPU kernels give the project's recorded results? One line per environment.

Why: a study's numbers must come out the same on another machine of the same
kind (issue 28). simfl's actors pin their CPU kernels (``simfl.core.determinism``);
this script runs :func:`~simfl.core.determinism.kernel_fingerprint` (a small
ConvNet trained 8 steps) in fresh processes:

- **pinned**: as a simfl actor starts (``actor_runtime_env()``, then ``pin_cpu_kernels``);
- **pinned, AVX2 caps**: the same with oneDNN, MKL and ATen capped at AVX2,
  i.e. what a machine without AVX-512 would run: must equal *pinned*;
- **native**: PyTorch as it comes (no pins): differs between machine models;
- **native, AVX2 caps**: differs from *native* on an AVX-512 machine, which
  shows that the caps reach the kernels.

Then it compares *pinned* with :data:`RECORDED`, the value on the machine
where the project's tables were measured. Exit code 1 when *pinned* differs
from its capped twin or from the record (then this machine's runs will not
reproduce the project's numbers; say so beside any figure measured on it).
CI prints this table (``.ci/run``) so that each CI machine reports its model.

    python benchmarks/reproducibility.py
"""

from __future__ import annotations

import os
import sys

from simfl.core.determinism import AVX2_MACHINE_ENV, actor_runtime_env, kernel_fingerprint_in
from simfl.core.provenance import cpu_flags, cpu_model

# kernel_fingerprint() pinned, and the machine it was recorded on (2026-12-07).
RECORDED = {"pinned": "e290fd01be1ef770",
            "machine": "AMD EPYC (cpu family 26, model 2, stepping 1: Zen 5), 2 cores, AVX-512; torch 2.14.1"}


def main() -> int:
    pinned_env = actor_runtime_env()["env_vars"]
    rows = {
        "pinned": kernel_fingerprint_in(pinned_env, pin=True),
        "pinned, AVX2 caps": kernel_fingerprint_in({**AVX2_MACHINE_ENV, **pinned_env}, pin=True),
        "native": kernel_fingerprint_in({}, pin=False),
        "native, AVX2 caps": kernel_fingerprint_in(AVX2_MACHINE_ENV, pin=False),
    }
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, AVX-512 {'yes' if 'avx512f' in cpu_flags() else 'no'}; "
          f"kernels {', '.join(f'{k}={v}' for k, v in pinned_env.items())}")
    print("| kernels | fingerprint |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    same_caps = rows["pinned"] == rows["pinned, AVX2 caps"]
    same_record = rows["pinned"] == RECORDED["pinned"]
    print(f"pinned = pinned with AVX2 caps: {'yes' if same_caps else 'NO'}; "
          f"pinned = recorded ({RECORDED['pinned']} on {RECORDED['machine']}): {'yes' if same_record else 'NO'}")
    return 0 if same_caps and same_record else 1


if __name__ == "__main__":
    sys.exit(main())
